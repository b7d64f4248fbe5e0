"""The work folder of a run: finished layers on disk, so a killed run can resume.

After each decoder layer the engine saves what it produced in the neutral representation
(quantized Linears plus the layer's float tensors, in compute dtype, and extra tensors such as
KV scales) and then records the layer as finished in ``state.json``. Resuming replays the
finished layers from these files (a forward pass each, no quantization) to rebuild the next
layer's inputs exactly, then goes on; the export takes those replayed layers from these files
(every other layer it takes from the engine, still in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .background import OneInFlight
from .errors import ExportError
from .host_copy import to_host
from .safetensors_dtypes import DTYPE_NAMES
from .scheme import QuantizedWeight, WeightScheme, quantized_as_tensors, quantized_from_tensors
from .weight_fingerprint import Fingerprint, check_unchanged, first_change

log = logging.getLogger(__name__)


class LayerRecord:
    """One finished layer: float tensors, quantized Linears, extra tensors (names relative to it)."""

    def __init__(self, floats: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                 extra: dict[str, torch.Tensor]):
        self.floats, self.quantized, self.extra = floats, quantized, extra


class WorkDir:
    """Layers are written in a background thread while the next layer is computed (one write
    in flight at a time, so at most one finished layer waits in device memory). An interrupted
    run still completes the write under way, so no layer file is ever half-written, and its
    error surfaces at the next save, load or `wait`."""

    def __init__(self, root: Path):
        self._weights: Fingerprint = {}
        self._writer = OneInFlight("quantkit-layer-writer")
        self.root = Path(root)
        self.layers = self.root / "layers"
        self.export = self.root / "export"
        self.state_file = self.root / "state.json"

    def start(self, fingerprint: str, resume: bool, weights: Fingerprint, model_dir: Path) -> int:
        """Prepare the folder; return how many layers are already finished (0 unless resuming).

        ``weights`` fingerprints the model's shards (`weight_fingerprint`): a resume over changed
        weights is refused naming the shard. A run without ``resume`` does not discard finished
        layers it could continue; it says to add --resume.
        """
        state = self._read_state()
        if resume and state is not None:
            if state.get("fingerprint") != fingerprint:
                raise ExportError(f"--resume: the work folder {self.root} belongs to a different recipe, model "
                                  "or calibration", field="--resume", file=self.root,
                                  hint="delete it or run without --resume")
            check_unchanged(state.get("weights"), weights, model_dir, "--resume")
            shutil.rmtree(self.export, ignore_errors=True)
            self._weights = weights
            return int(state["finished_layers"])
        finished = int(state.get("finished_layers", 0)) if state else 0
        if finished:
            same_weights = state.get("weights") is not None and first_change(state["weights"], weights) is None
            if state.get("fingerprint") == fingerprint and same_weights:
                raise ExportError(f"{self.root} holds {finished} finished layers of an earlier run of this recipe",
                                  field="--resume", file=self.root,
                                  hint="add --resume to continue it, or delete that folder to start over")
            log.warning("discarding %d finished layers of another recipe or model in %s", finished, self.root)
        if self.root.exists():
            shutil.rmtree(self.root)
        self.layers.mkdir(parents=True)
        self._weights = weights
        self._write_state(fingerprint, 0)
        return 0

    def _read_state(self) -> dict[str, Any] | None:
        """The state of an earlier run, or None when there is none (or it cannot be read)."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("finished_layers"), int) else None

    def _write_state(self, fingerprint: str, finished: int) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "finished_layers": finished,
                                   "weights": self._weights}))
        os.replace(tmp, self.state_file)

    def finished_layers(self) -> int:
        """How many layers are finished and kept (for messages after a failure, whose own error
        wins over one of the write in flight)."""
        self._writer.settle()
        state = self._read_state()
        return int(state["finished_layers"]) if state else 0

    def layer_path(self, i: int) -> Path:
        return self.layers / f"{i:05d}.safetensors"

    def save_layer(self, i: int, record: LayerRecord, fingerprint: str) -> None:
        """Start writing layer ``i`` (its tensors are not changed afterwards: the engine gives the
        layer new ones); the previous layer's write finishes first."""
        self._writer.submit(self._write_layer, i, record, fingerprint)

    def wait(self) -> None:
        """Until the layer write in flight is on disk; raise its error if it failed."""
        self._writer.wait()

    def _write_layer(self, i: int, record: LayerRecord, fingerprint: str) -> None:
        """Write layer ``i`` atomically, then mark it finished: a kill leaves either both or neither."""
        tensors: dict[str, torch.Tensor] = {f"float.{k}": v for k, v in record.floats.items()}
        tensors.update({f"extra.{k}": v for k, v in record.extra.items()})
        quantized, schemes = quantized_as_tensors(record.quantized)
        nibbles = [f"{n}.codes" for n, qw in record.quantized.items() if _fits_nibbles(qw)]
        for k in nibbles:
            quantized[k] = pack_nibbles(quantized[k])
        tensors.update({f"q.{k}": v for k, v in quantized.items()})
        tmp = self.layer_path(i).with_suffix(".tmp")
        try:
            write_safetensors(tmp, tensors, {"schemes": json.dumps(schemes), "nibbles": json.dumps(nibbles)})
        except BaseException:  # a full disk or an interrupt: leave no partial file taking space
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.layer_path(i))
        self._write_state(fingerprint, i + 1)

    def load_layer(self, i: int) -> LayerRecord:
        self.wait()
        path = self.layer_path(i)
        with safe_open(path, framework="pt") as f:
            schemes = json.loads(f.metadata()["schemes"])
            nibbles = set(json.loads(f.metadata().get("nibbles", "[]")))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        floats = {k[6:]: v for k, v in tensors.items() if k.startswith("float.")}
        extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        quantized = {k[2:]: unpack_nibbles(v) if k[2:] in nibbles else v
                     for k, v in tensors.items() if k.startswith("q.")}
        quantized = quantized_from_tensors(quantized, schemes)
        return LayerRecord(floats, quantized, extra)

    def remove(self) -> None:
        self._writer.close()
        shutil.rmtree(self.root, ignore_errors=True)


def packs_nibbles(weights: WeightScheme) -> bool:
    """Whether the work folder keeps a scheme's codes two to a byte: integer codes of at most 4
    bits (what validation's disk check counts too)."""
    return weights.type == "int" and weights.num_bits <= 4


def _fits_nibbles(qw: QuantizedWeight) -> bool:
    """``packs_nibbles`` codes as int8 in rows of even length."""
    return packs_nibbles(qw.scheme.weights) and qw.codes.dtype == torch.int8 and qw.codes.shape[-1] % 2 == 0


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes ``[..., 2m]`` (int8) as bytes ``[..., m]``, the even column in the low
    half: a 4-bit run's work folder (every layer of the model until the export is done) takes
    half the disk, and half the copy off the device, of one byte per code."""
    low, high = codes[..., 0::2], codes[..., 1::2]
    return ((low & 0xF) | (high << 4)).view(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: each half sign-extended back to int8."""
    b = packed.view(torch.int8)
    low = (b << 4) >> 4  # arithmetic shifts: the low nibble's sign bit spreads up
    high = b >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time, each brought to the host only while
    it is written (``save_file`` wants every tensor on the host and copies them all again into
    one bytes object: twice a layer's size in host memory)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if t.numel():
                f.write(to_host(t).contiguous().reshape(-1).view(torch.uint8).numpy().data)


def fingerprint(*parts: Any) -> str:
    """A stable hash of everything that decides a run's layer results."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, (list, tuple)):
            h.update(fingerprint(*p).encode())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()
