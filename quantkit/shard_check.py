"""Safetensors files checked from their headers alone, before any weight is trusted.

A shard is read for hours after a run starts; one whose header lies (a dtype, a shape, offsets
past the end of a truncated file) used to surface only when its layer came up, as a traceback,
or never (a relabelled dtype quantizes to garbage and exits 0). Everything here reads the
8-byte length and the JSON header, stats the file, and compares with what the model's config
implies: a 70B's thirty shards take milliseconds.

Every failure is one line naming the file and the tensor. A run reports them all (logged) and
raises the first as the error the CLI prints.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping


from .errors import ExportError, ModelError

log = logging.getLogger(__name__)

# Bytes per element of every dtype the safetensors format names (sub-byte F4/F6 are not used by
# any model quantkit reads; they are reported as unknown).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
WIDE_FLOATS = {"F32", "F64"}  # a wider container than the checkpoint's own dtype loses nothing
MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: dtype in safetensors notation, shape, absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def shard_entries(path: Path) -> tuple[dict[str, TensorEntry], list[str]]:
    """The tensors a shard's header describes, and one line per problem found.

    The file must hold exactly its header and the data the offsets cover, back to back, as the
    safetensors library requires; each tensor's byte range must match its dtype and shape.
    A file's header is parsed once while the file is unchanged (same inode, size and times):
    validation, the index check and the model's reader each ask, and Qwen3-30B-A3B's headers
    hold 18,867 tensors.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return _shard_entries(path)
    entries, problems = _cached_entries(path, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return dict(entries), list(problems)


@functools.lru_cache(maxsize=256)
def _cached_entries(path: Path, _stat: tuple[int, ...]) -> tuple[dict[str, TensorEntry], list[str]]:
    return _shard_entries(path)


def _shard_entries(path: Path) -> tuple[dict[str, TensorEntry], list[str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return {}, [f"{path}: {size} bytes, too short for a safetensors header (the file is truncated)"]
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER or 8 + n > size:
                return {}, [f"{path}: header length {n} exceeds the file's {size} bytes "
                            "(truncated, or not a safetensors file)"]
            raw = f.read(n)
    except OSError as e:
        return {}, [f"{path}: cannot be read ({e.strerror or e})"]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return {}, [f"{path}: header is not valid JSON ({type(e).__name__}); the file is damaged"]
    if not isinstance(header, dict):
        return {}, [f"{path}: header is not a JSON object; the file is damaged"]
    data_start, data_size = 8 + n, size - 8 - n
    entries: dict[str, TensorEntry] = {}
    problems: list[str] = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        entry, problem = _entry(spec, data_start)
        if problem:
            problems.append(f"{path}: tensor {name}: {problem}")
        else:
            entries[name] = entry
    end = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        rel_begin, rel_end = e.begin - data_start, e.end - data_start
        if rel_begin < end:
            problems.append(f"{path}: tensor {name}: bytes {rel_begin}..{rel_end} overlap the previous tensor's")
        elif rel_begin > end:
            problems.append(f"{path}: tensor {name}: starts at byte {rel_begin}, leaving a gap after byte {end}")
        if rel_end > data_size:
            problems.append(f"{path}: tensor {name}: ends at byte {rel_end} of data but the file holds "
                            f"{data_size} (the file is truncated)")
        end = max(end, rel_end)
    if end < data_size and not any("truncated" in p for p in problems):
        problems.append(f"{path}: {data_size - end} bytes after the last tensor; the file is damaged")
    return entries, problems


def _entry(spec: object, data_start: int) -> tuple[TensorEntry | None, str | None]:
    if not isinstance(spec, dict):
        return None, "header entry is not an object"
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return None, f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return None, f"malformed shape {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        return None, f"malformed data_offsets {offsets!r}"
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
        return None, (f"{dtype} {shape} needs {numel * DTYPE_BYTES[dtype]} bytes but its offsets span "
                      f"{offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]), None


def model_file_error(problem: str, path: Path, more: int = 0) -> ModelError:
    """The error for a problem of the model's files (``more``: how many others were logged)."""
    return ModelError(problem + (f" (and {more} more, listed above)" if more else ""), field="model.id", file=path,
                      hint="re-download or re-convert the model")


def read_entries(path: Path) -> dict[str, TensorEntry]:
    """A shard's tensors, or `ModelError` naming the file and its first problem."""
    entries, problems = shard_entries(path)
    if problems:
        raise model_file_error(problems[0], path)
    return entries


def model_file_problems(model_dir: Path, weight_map: Mapping[str, str], expected: Mapping[str, tuple[int, ...]],
                        tied: Collection[str] = ()) -> list[str]:
    """Every problem of a model folder's shards against its index and its config's tensors
    (``expected``: checkpoint name -> shape).

    Tensors the shards hold but the model does not use are fine (old checkpoints carry rotary
    buffers). A tensor in ``tied`` (lm_head of a tied model) may be absent.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    listed_in = index.name if index.is_file() else "the shards"
    problems: list[str] = []
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    headers: dict[str, dict[str, TensorEntry]] = {}
    for shard, names in sorted(by_shard.items()):
        path = model_dir / shard
        if not path.is_file():
            problems.append(f"{path}: shard listed in {listed_in} (tensor {sorted(names)[0]}) is missing")
            continue
        entries, found = shard_entries(path)
        problems += found
        headers[shard] = entries
        if found and not entries:
            continue
        for name in sorted(names):
            if name not in entries and not any(p.startswith(f"{path}: tensor {name}:") for p in found):
                problems.append(f"{path}: tensor {name} is listed in {listed_in} but not in this shard's header")
    located = {name: headers[shard][name] for name, shard in weight_map.items()
               if name in headers.get(shard, {})}
    floats = Counter(located[n].dtype for n in expected if n in located and located[n].dtype in FLOAT_DTYPES)
    main_dtype = floats.most_common(1)[0][0] if floats else None
    for name, shape in expected.items():
        shard = weight_map.get(name)
        if shard is None:
            if name not in tied:
                problems.append(f"{model_dir}: tensor {name} is missing from {listed_in} "
                                f"(the config implies shape {list(shape)})")
            continue
        entry = located.get(name)
        if entry is None:
            continue  # its shard's own problem is already reported
        path = model_dir / shard
        if entry.shape != shape:
            problems.append(f"{path}: tensor {name} has shape {list(entry.shape)}, the config implies {list(shape)}")
        if entry.dtype not in FLOAT_DTYPES:
            problems.append(f"{path}: tensor {name} is {entry.dtype}, but the model needs a float tensor there "
                            "(an already-quantized or damaged checkpoint)")
        elif entry.dtype != main_dtype and entry.dtype not in WIDE_FLOATS:
            problems.append(f"{path}: tensor {name} is {entry.dtype} while the checkpoint's other tensors are "
                            f"{main_dtype}; its header's dtype does not match the data")
    return problems


def check_model_files(runner) -> None:
    """Refuse a model whose shards do not match its index and config, before any layer runs.

    ``runner`` is the `ModelRunner` (the model built from its config on the meta device, and
    its checkpoint names). Each problem is logged as one line; the first is raised as `ModelError`.
    """
    names = runner.names
    # A source quantized by its authors is checked as stored: its codes and scale tensors are
    # not float, and the dequantization checks their shapes as it reads them.
    source = runner.source
    stored = getattr(source, "base", source)
    dequantized = getattr(source, "dequantized", set())
    expected = {names.source_of(k): tuple(v.shape) for k, v in runner.model.state_dict().items()
                if k not in names.converted.values() and names.source_of(k) not in dequantized
                and not names.held_fused(k)}
    expected.update(names.fused_shapes())
    tied = {names.source_of(k) for k in (getattr(runner.model, "all_tied_weights_keys", None) or {})}
    raise_problems(model_file_problems(stored.path, stored.weight_map, expected, tied))


def raise_problems(problems: list[str]) -> None:
    """Log every problem but the first as one line each, and raise the first as `ModelError`."""
    if not problems:
        return
    for p in problems[1:]:
        log.error("%s", p)
    raise model_file_error(problems[0], Path(problems[0].split(": ")[0]), len(problems) - 1)


def check_complete_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header does not parse or whose data does not fit its size
    (what an interrupted copy or a full disk leaves)."""
    problems = shard_entries(path)[1]
    if problems:
        raise ExportError(problems[0], file=path, hint="re-run the quantization into a fresh output_dir")

