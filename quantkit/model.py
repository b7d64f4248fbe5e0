"""ModelSource: where a model's files are, and lazy access to its tensors.

Weights are read one tensor at a time from memory-mapped safetensors shards, so holding a
``ModelSource`` costs nothing until a layer asks for its tensors. ``materialized`` counts the
bytes of tensors handed out and still alive: tests use it to prove the engine keeps one
layer in memory, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from safetensors import SafetensorError, safe_open

from .bulk_read import Extent, read_extents, unreadable_tensor
from .errors import ModelError
from .safetensors_dtypes import TORCH_DTYPES
from .shard_check import model_file_error, model_file_problems, raise_problems, read_entries, shard_entries
from .source_dequant import quantized_kind

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve_model_dir(model: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is, or a hub id downloaded (config, tokenizer, safetensors only)."""
    local = local_model_dir(model)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(model, revision=revision, token=token, allow_patterns=_WEIGHT_PATTERNS,
                              endpoint=os.environ.get("HF_ENDPOINT"))
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise unreachable_hub_model(model, e) from None


def cached_hub_model_dir(model: str, revision: str | None = None) -> Path | None:
    """The hub model's folder in the local Hugging Face cache, if that revision is there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=_WEIGHT_PATTERNS,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def unreachable_hub_model(model: str, e: Exception) -> ModelError:
    return ModelError(
        f"model.id: '{model}' is neither a local folder nor a reachable hub repo ({type(e).__name__})",
        field="model.id", value=model, hint="check the path, the id, or your network/HF_TOKEN")


def local_model_dir(model: str) -> Path | None:
    """A built-in model's or a local model's folder (a local .gguf converted once to one); None
    when ``model`` is a hub id."""
    if model.startswith("builtin:"):
        from .assets import builtin_model_dir

        return builtin_model_dir(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        from .assets import gguf_model_dir

        return gguf_model_dir(path)
    if path.exists():
        raise ModelError(f"model.id: {model} is a file", field="model.id", value=model, file=path,
                         hint="give the model's folder (config.json, *.safetensors, tokenizer) or a hub id (org/name)")
    if model.startswith((".", "/", "~")):
        raise ModelError(f"model.id: {model} does not exist", field="model.id", value=model, file=path,
                         hint="give a local model folder or a hub id (org/name)")
    return None


@dataclass
class _Counter:
    """Bytes alive and their peak; the export's thread (untouched source tensors it casts)
    counts beside the main one."""

    alive: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, n: int) -> None:
        with self.lock:
            self.alive += n
            self.peak = max(self.peak, self.alive)

    def sub(self, n: int) -> None:
        with self.lock:
            self.alive -= n


@dataclass
class ModelSource:
    """A resolved model folder with its config and a lazy tensor reader."""

    path: Path
    config: dict[str, Any]
    weight_map: dict[str, str]
    materialized: _Counter = field(default_factory=_Counter)

    @classmethod
    def open(
        cls,
        model: str,
        revision: str | None = None,
        allow_pickle: bool = False,
        token: str | None = None,
    ) -> "ModelSource":
        path = resolve_model_dir(model, revision, token)
        return cls(path=path, config=read_config(path / "config.json"), weight_map=_weight_map(path, allow_pickle))

    def shard_files(self) -> list[Path]:
        """The weight files, each once, in name order."""
        return [self.path / s for s in sorted(set(self.weight_map.values()))]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard; counted in ``materialized`` while alive."""
        with self.reader() as r:
            return r.tensor(name)

    def reader(self) -> "ShardReader":
        """A reader of many tensors (a layer's) that opens each shard once."""
        return ShardReader(self)

    def tensor_location(self, name: str) -> tuple[Path, str, list[int], int, int]:
        """Where ``name``'s bytes lie: (shard file, safetensors dtype such as ``BF16``, shape,
        first byte, end byte), read from the shard's header alone."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise _missing_tensor(name, self.path)
        path = self.path / shard
        entry = read_entries(path)[name]
        return path, entry.dtype, list(entry.shape), entry.begin, entry.end

    def extents(self, names: list[str]) -> list[Extent]:
        """Where each of ``names``' bytes lie, from the shard headers (each parsed once): a
        missing tensor, or a shard whose header is damaged, raises the error that reading it would."""
        entries: dict[str, dict[str, Any]] = {}
        out = []
        for name in names:
            shard = self.weight_map.get(name)
            if shard is None:
                raise _missing_tensor(name, self.path)
            path = self.path / shard
            if shard not in entries:
                try:
                    entries[shard] = read_entries(path)
                except ModelError as e:
                    raise unreadable_tensor(name, path, e.message) from None
            entry = entries[shard].get(name)
            if entry is None or entry.dtype not in TORCH_DTYPES:
                why = "not in the shard's header" if entry is None else f"unknown dtype {entry.dtype}"
                raise unreadable_tensor(name, path, why)
            out.append(Extent(name, path, TORCH_DTYPES[entry.dtype], entry.shape, entry.begin, entry.end))
        return out

    def tensor_headers(self) -> dict[str, dict[str, Any]]:
        """Every tensor's ``dtype`` and ``shape`` from the shard headers alone (each checked):
        what validation knows of the weights without reading one."""
        raise_problems(model_file_problems(self.path, self.weight_map, {}))
        entries: dict[str, dict[str, Any]] = {}
        for shard in self.shard_files():
            entries.update({k: {"dtype": e.dtype, "shape": list(e.shape)} for k, e in read_entries(shard).items()})
        return entries

    def tensor_on(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``name`` on ``device``, floating-point in ``dtype``: on a GPU read in bulk through a few
        chunks of host memory (a 128k-vocabulary embedding is 1-2 GB: read whole, it would be held
        twice on the host, the mapped file pages and the copy), cast there."""
        with self.reader() as r:
            return r.to_device_all([name], device, dtype)[name]

    def tensors_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix`` (e.g. ``model.layers.3.``), keys without the prefix."""
        return {
            name[len(prefix):]: self.tensor(name)
            for name in self.weight_map
            if name.startswith(prefix)
        }

    def companion_files(self) -> list[Path]:
        """The files besides weights and config that loaders read from the model's folder: the
        tokenizer, a multimodal model's processors (vLLM builds its input processor from them and
        refuses to start without), the generation defaults. The output carries them unchanged."""
        names = (
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
            "chat_template.jinja", "chat_template.json",
            "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
            "generation_config.json",
        )
        return [self.path / n for n in names if (self.path / n).is_file()]


class TensorReader(Protocol):
    """What reads a layer's tensors: a ``ShardReader``, or its dequantizing view."""

    def tensor(self, name: str) -> torch.Tensor: ...

    def to_device(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor: ...

    def to_device_all(self, names: list[str], device: torch.device,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]: ...


class ShardReader:
    """Reads a source's tensors with each shard opened once for the reader's life.

    A MoE layer is 400-1,200 tensors in one shard, and every ``safe_open`` parses the shard's
    whole JSON header: opened per tensor, the header parsing grows with the square of the
    expert count. On the CPU tensors are read one at a time (host memory: the tensor being
    copied); for a GPU, ``to_device_all`` and ``stream`` read many in bulk (``bulk_read``: a few
    reused page-locked chunks). One reader serves one thread.

    The pages a handle's tensors were read from stay mapped, and counted in the process's
    resident memory, until it closes: a handle is closed after ``REMAP_BYTES`` so that a
    layer of gigabytes (Mixtral-8x7B's: 2.9 GB; DeepSeek-V3's: 11 GB of FP8 codes) is not
    resident at once (a few more opens per layer: one per 256 MiB).
    """

    REMAP_BYTES = 256 << 20
    BULK_DEVICES = ("cuda",) if hasattr(os, "preadv") else ()
    """Device types whose tensors are read in bulk (``bulk_read``, which needs ``os.preadv``:
    not on Windows, where every device reads one tensor at a time). Not the CPU: there
    safetensors hands out tensors mapped from the file, read when first used, where the bulk
    read copies every byte twice up front (a real-shaped Qwen3-30B-A3B layer, 1.2 GB in the page
    cache: 0.18 s one at a time, 1.7-3.0 s in bulk on a shared 2-core machine). To a GPU the
    mapped pages were faulted in during pageable copies, one tensor at a time."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._files: dict[str, Any] = {}
        self._mapped: dict[str, int] = {}  # bytes read through each open handle

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for shard in list(self._files):
            self._close(shard)

    def _close(self, shard: str) -> None:
        self._files.pop(shard).__exit__(None, None, None)
        self._mapped.pop(shard, None)

    def tensor(self, name: str) -> torch.Tensor:
        """``name`` on the host as the shard stores it; counted in ``materialized`` while alive."""
        shard = self.source.weight_map.get(name)
        if shard is None:
            raise _missing_tensor(name, self.source.path)
        path = self.source.path / shard
        try:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = safe_open(path, framework="pt").__enter__()
            t = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise unreadable_tensor(name, path, e) from None
        n = t.numel() * t.element_size()
        self.source.materialized.add(n)
        weakref.finalize(t, self.source.materialized.sub, n)
        self._mapped[shard] = self._mapped.get(shard, 0) + n
        if self._mapped[shard] >= self.REMAP_BYTES:
            self._close(shard)
        return t

    def to_device(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``name`` on ``device``, floating-point tensors in ``dtype``, integer ones as stored."""
        t = self.tensor(name)
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    def to_device_all(self, names: list[str], device: torch.device,
                      dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Each of ``names`` on ``device``, floating-point tensors in ``dtype`` (as stored when
        None), integer ones as stored."""
        with contextlib.closing(self.stream(names, device, dtype)) as tensors:
            return dict(tensors)

    def stream(self, names: list[str], device: torch.device,
               dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """``to_device_all`` one tensor at a time, as each arrives: read in bulk where
        ``BULK_DEVICES`` says (in file order), else one at a time as ``to_device``."""
        names = list(dict.fromkeys(names))
        if device.type in self.BULK_DEVICES:
            with contextlib.closing(read_extents(self.source.extents(names), device, dtype)) as tensors:
                for i, t in tensors:
                    yield names[i], t
            return
        for n in names:
            yield n, self.tensor(n).to(device) if dtype is None else self.to_device(n, device, dtype)


def _missing_tensor(name: str, folder: Path) -> ModelError:
    return ModelError(f"model: tensor '{name}' is missing from {folder}", value=name, file=folder,
                      hint="the checkpoint does not match its config; re-download or re-convert it")


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, or `ModelError` when its files are missing or broken."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a missing or malformed tokenizer
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"model.id: {model_dir}: the tokenizer cannot be loaded ({type(e).__name__}: {first})",
                         field="model.id", value=str(model_dir),
                         hint="the folder needs tokenizer.json or tokenizer.model with tokenizer_config.json") from None


def read_config(cfg_file: Path, quantized_ok: bool = False) -> dict[str, Any]:
    """config.json as a dict; a malformed one is refused, and so is one of an already-quantized
    model unless ``quantized_ok`` (evaluating a checkpoint) or its authors' quantization is one
    quantkit reads as the float values it stands for (DeepSeek-V3's FP8 blocks, gpt-oss's MXFP4)."""
    if not cfg_file.is_file():
        raise ModelError(f"model.id: {cfg_file.parent} has no config.json", field="model.id",
                         value=str(cfg_file.parent), file=cfg_file, hint="give the folder of a Hugging Face model")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"model.id: {cfg_file} is not valid JSON ({e})", field="model.id", file=cfg_file,
                         hint="fix or re-download config.json") from None
    if not isinstance(config, dict):
        raise ModelError(f"model.id: {cfg_file} is not a JSON object of config fields", field="model.id",
                         file=cfg_file, hint="fix or re-download config.json")
    quantized = config.get("quantization_config")
    if quantized is not None and not quantized_ok and quantized_kind(quantized) is None:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise ModelError(f"model.id: {cfg_file.parent} is already quantized ({method}: config.json has a "
                         "quantization_config)", field="model.id", value=str(cfg_file.parent), file=cfg_file,
                         hint="give the original float model (its bf16/fp16 safetensors)")
    return config


def _weight_map(path: Path, allow_pickle: bool) -> dict[str, str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            weight_map = e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError(f"model.id: {index} is not a valid index (JSON with a weight_map of tensor -> "
                             "shard file)", field="model.id", file=index, hint="fix or re-download it")
        return dict(weight_map)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    if shards:
        out: dict[str, str] = {}
        for s in shards:
            entries, problems = shard_entries(path / s)
            if problems and not entries:  # else the tensors' own problems are all reported at the check
                raise model_file_error(problems[0], path / s)
            for k in entries:
                if k in out:
                    raise ModelError(f"model.id: tensor {k} is in both {path / out[k]} and {path / s}, and no "
                                     "model.safetensors.index.json says which to use", field="model.id",
                                     file=path / s, hint="remove the stale shard")
                out[k] = s
        return out
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles and not allow_pickle:
        raise ModelError(
            f"model.id: {path} has only pickle weights ({pickles[0]}); pickle can run code when loaded",
            field="model.allow_pickle", value=False, file=path / pickles[0],
            hint="convert to safetensors, or set model.allow_pickle: true if you trust it")
    if pickles:
        return _convert_pickle(path, pickles)
    raise ModelError(f"model.id: {path} has no weights (no *.safetensors, nor *.bin/*.pt to load with "
                     "model.allow_pickle: true)", field="model.id", file=path)


def _convert_pickle(path: Path, pickles: list[str]) -> dict[str, str]:
    """Opted-in pickle: convert once to safetensors in a cache beside the model."""
    from safetensors.torch import save_file

    # One folder per model: two models' pytorch_model.bin must not convert onto one file.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit")) / "pickle" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for name in pickles:
        log.warning("loading pickle weights %s because model.allow_pickle is true", path / name)
        try:
            sd = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and containers
            raise ModelError(f"model.id: {path / name} is not a plain state dict of tensors ({type(e).__name__})",
                             field="model.id", file=path / name, hint="convert it to safetensors") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ModelError(f"model.id: {path / name} is not a flat state dict of tensors", field="model.id",
                             file=path / name, hint="convert it to safetensors")
        target = out_dir / (Path(name).stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(target))
        weight_map.update({k: str(target) for k in sd})
    return weight_map
