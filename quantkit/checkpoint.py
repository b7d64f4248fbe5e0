"""CheckpointWriter: sharded safetensors in a staging folder, published atomically.

Every format shares this: each tensor is written to the open shard file as it arrives (host
memory holds one tensor, never a shard: buffering a 5 GB shard, which safetensors' save_file
then copies again into bytes, made the host peak twice the checkpoint), the shard's header
goes into room reserved at the file's start once ``max_shard_size`` is reached, each full
shard is a complete file in the staging folder (inside the run's hidden work folder beside
``output_dir``), and only when the index, config and tokenizer are written is the folder
renamed into place. A failure leaves any previous output untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError
from .finite_check import all_finite, check_quantized, check_quantized_stack, check_written, check_written_stack
from .formats.base import Format
from .host_copy import to_host
from .interrupts import deferred_interrupts
from .output_guard import MARKER, check_replaceable, marker_text, old_dir_for, recover_interrupted_publish
from .safetensors_dtypes import DTYPE_NAMES
from .scheme import QuantizedWeight

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# Room for a shard's JSON header, reserved at the start of each shard and padded with spaces
# (which the safetensors format allows). About 120 bytes a tensor: a 5 GB shard of Llama-8B
# layers has about 300 tensors, of a MoE's experts 10,000 or more. A shard closes when its next
# tensor's entry would not fit, as when its bytes would pass max_shard_size: rewriting a shard
# behind a longer header cost a full copy of it (GBs for a MoE) on every shard.
HEADER_ROOM = 1024 * 1024
_HEADER_START = b'{"__metadata__":{"format":"pt"}'


def work_dir_for(output_dir: Path) -> Path:
    """The hidden folder beside the output (same filesystem, so the final rename is atomic)."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.quantkit-partial"


class CheckpointWriter:
    def __init__(self, output_dir: Path, staging_dir: Path, fmt: Format, dtype: torch.dtype,
                 max_shard_size: int, overwrite: bool):
        self.output_dir = Path(output_dir)
        self.fmt, self.dtype, self.max_shard_size, self.overwrite = fmt, dtype, max_shard_size, overwrite
        self.work_dir = Path(staging_dir)
        self._file = None
        self._entries: dict[str, bytes] = {}  # the open shard's header, one JSON entry a tensor
        self._header_entry_bytes = 0
        self._buffer_bytes = 0
        self._names: set[str] = set()
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.published = False  # True once the output folder is the new checkpoint

    def check_target(self) -> None:
        """Refuse an existing output before any weight is read, unless overwrite is set and
        quantkit wrote it."""
        check_replaceable(self.output_dir, self.overwrite)

    def start(self) -> None:
        self.check_target()
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)

    def add(self, name: str, tensor: torch.Tensor, keep_dtype: bool = False) -> None:
        """Write one tensor; float tensors are cast to the export dtype unless ``keep_dtype``
        (cast and checked where the tensor is, as ``_put`` checks)."""
        t = tensor.detach()
        if t.is_floating_point() and not keep_dtype:
            cast = t.to(self.dtype)
            if not all_finite(cast) and all_finite(t):
                dtype = str(self.dtype).replace("torch.", "")
                raise ExportError(f"{name} overflows {dtype} on export", field="model.dtype", value=dtype,
                                  file=name, hint="set model.dtype: bfloat16 or float32")
            t = cast
        self._put(name, t)

    def _put(self, name: str, t: torch.Tensor) -> None:
        # Checked where it is: on a GPU a reduction there. On the host, in the export's thread
        # beside the engine's, a Mixtral layer's checks took 1.4 s instead of 0.04 s alone.
        check_written(name, t)
        self._write(name, to_host(t).contiguous())

    def _write(self, name: str, t: torch.Tensor) -> None:
        """Append a host tensor that passed ``check_written``."""
        n = t.numel() * t.element_size()
        f, entry = self._open(name, DTYPE_NAMES[t.dtype], list(t.shape), n)
        if n:
            _write_all(f, t.reshape(-1).view(torch.uint8).numpy().data)
        self._record(name, entry, n)

    def add_file_range(self, name: str, dtype: str, shape: list[int], path: Path, start: int, end: int) -> None:
        """Copy a tensor's bytes as they are from another safetensors file (``dtype`` in its
        notation), 64 MiB at a time: the embedding and lm_head never sit whole in memory."""
        f, entry = self._open(name, dtype, shape, end - start)
        with open(path, "rb") as src:
            pos, left = start, end - start
            try:  # in the kernel, no bytes through Python
                while left:
                    n = os.copy_file_range(src.fileno(), f.fileno(), left, pos)
                    if n == 0:
                        break
                    pos, left = pos + n, left - n
            except (AttributeError, OSError):  # no copy_file_range (or not across these files)
                pass
            src.seek(pos)
            while left:
                chunk = src.read(min(left, 64 << 20))
                if not chunk:
                    raise ExportError(f"{path}: ends inside tensor {name}", file=path, value=name,
                                      hint="the model file is truncated; re-download or re-convert it")
                _write_all(f, chunk)
                left -= len(chunk)
        self._record(name, entry, end - start)

    @property
    def written(self) -> set[str]:
        """Names of every tensor written so far."""
        return set(self._names)

    def export_dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def _open(self, name: str, dtype: str, shape: list[int], n: int):
        """The open shard, ready for ``n`` more bytes of tensor ``name``, and the tensor's header
        entry there."""
        if name in self._names:
            raise ExportError(f"internal: tensor {name} written twice", file=name)
        self._names.add(name)
        # Close the shard before a tensor that would push it past the limit: max_shard_size is
        # the largest shard (only a single tensor bigger than the limit gets a shard above it).
        # The entry at the current offsets bounds it in a new shard (offsets from 0).
        entry = _entry_json(name, dtype, shape, self._buffer_bytes, n)
        if self._file is not None and self._buffer_bytes and (
                self._buffer_bytes + n > self.max_shard_size or self._header_size() + len(entry) > HEADER_ROOM - 8):
            self.flush()
            entry = _entry_json(name, dtype, shape, 0, n)
        if self._file is None:
            # unbuffered: copy_file_range writes at the descriptor's offset too
            self._file = open(self.work_dir / self._part_name(), "wb", buffering=0)
            self._file.seek(HEADER_ROOM)
        return self._file, entry

    def _record(self, name: str, entry: bytes, n: int) -> None:
        """Add tensor ``name`` (``n`` bytes just written) with its header entry from ``_open``."""
        self._entries[name] = entry
        self._header_entry_bytes += len(entry)
        self._buffer_bytes += n

    def _header_size(self) -> int:
        return len(_HEADER_START) + self._header_entry_bytes + 1

    def _part_name(self) -> str:
        return f"part-{len(self._shards) + 1:05d}.safetensors"

    def add_quantized(self, prefix: str, qw: QuantizedWeight) -> None:
        check_quantized(prefix, qw)
        for name, t in self.fmt.weight_tensors(prefix, qw, self.dtype).items():
            self._put(name, t)

    def pack_stack(self, prefixes: list[str], qws: list[QuantizedWeight],
                   stack: QuantizedWeight) -> list[dict[str, torch.Tensor]]:
        """The tensors of Linears of one scheme and shape (``qws``, at ``prefixes``), packed by
        the format as one stack (``stack``, on the device that packs) and brought to the host
        once, checked as ``add_quantized`` checks them but with one reduction per stacked
        tensor; write each Linear's with ``add_packed``. Only for ``fmt.stacks(scheme)``."""
        check_quantized_stack(prefixes, qws, stack)
        fields = self.fmt.stacked_tensors(prefixes, stack, self.dtype)
        for k, t in fields.items():  # on the packing device, as _put checks
            check_written_stack([f"{p}.{k}" for p in prefixes], t)
        fields = {k: to_host(t) for k, t in fields.items()}
        return [{f"{p}.{k}": t[i] for k, t in fields.items()} for i, p in enumerate(prefixes)]

    def add_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write one Linear's tensors from ``pack_stack`` (checked there)."""
        for name, t in tensors.items():
            self._write(name, t.contiguous())

    def flush(self) -> None:
        """Close the open shard: its header goes into the room reserved at the start."""
        if self._file is None:
            return
        f, self._file = self._file, None
        header = _HEADER_START + b"".join(self._entries.values()) + b"}"
        if len(header) + 8 > HEADER_ROOM:  # _open closes shards before this; never a corrupt header
            f.close()
            raise ExportError(f"internal: the safetensors header of {f.name} outgrew its room", file=f.name)
        f.seek(0)
        _write_all(f, struct.pack("<Q", HEADER_ROOM - 8) + header + b" " * (HEADER_ROOM - 8 - len(header)))
        f.close()
        path = Path(f.name)
        self._shards.append((path.name, list(self._entries)))
        self.total_bytes += self._buffer_bytes
        self._entries, self._buffer_bytes, self._header_entry_bytes = {}, 0, 0

    def finalize(self, config: dict[str, Any], files: dict[str, str | bytes], copy_files: list[Path]) -> Path:
        """Name shards, write index/config/extra files, then publish the folder atomically."""
        self.flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._shards, start=1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.work_dir / part, self.work_dir / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.work_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (self.work_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (self.work_dir / MARKER).write_text(marker_text())
        for src in copy_files:
            shutil.copy2(src, self.work_dir / src.name)
        for name, content in files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(self.work_dir / name, mode) as f:
                f.write(content)
        self._publish()
        return self.output_dir

    def _publish(self) -> None:
        """Swap the finished folder into place; the old output is removed only once the new one is there."""
        recover_interrupted_publish(self.output_dir)
        try:
            check_replaceable(self.output_dir, self.overwrite)
        except ExportError as e:
            raise ExportError(f"{e.message} (it appeared or changed during the run); the finished checkpoint is "
                              f"kept in {self.work_dir}", field=e.field, value=e.value, hint=e.hint) from None
        old = old_dir_for(self.output_dir)
        _remove(old)  # left by a publish killed after its swap: the output is newer
        with deferred_interrupts():
            if self.output_dir.exists():
                os.replace(self.output_dir, old)
            os.replace(self.work_dir, self.output_dir)
            self.published = True
            _remove(old)


def _remove(path: Path) -> None:
    """Remove a folder, or only the link when it is one (never what a linked output pointed to)."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _entry_json(name: str, dtype: str, shape: list[int], start: int, n: int) -> bytes:
    """One tensor's part of a shard header, with its leading comma (the header begins with
    the metadata entry)."""
    entry = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + n]}
    return b"," + json.dumps({name: entry}, separators=(",", ":")).encode()[1:-1]


def _write_all(f, data) -> None:
    """An unbuffered write may take fewer bytes than given (Linux caps one write near 2 GiB)."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[f.write(view):]
