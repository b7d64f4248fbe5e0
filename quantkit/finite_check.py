"""NaN, Inf and zero scales stop a run where they are read or written, naming the tensor.

Layers are checked as the engine loads them; the tensors it does not load as a layer (the
embedding, the final norm, lm_head, which the export copies byte for byte) are checked once
before any layer runs, a chunk of rows at a time. Every float tensor a checkpoint stores but
FP8 codes (see `all_finite`) passes `check_written` in the writer: a scale that is NaN, Inf or
zero (a float16 scale underflows to zero, overflows to Inf; an E4M3 group scale or an FP32
global scale likewise) is never published, nor an E8M0 scale holding its NaN code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from .errors import NumericsError
from .model import ShardReader
from .scheme import QuantizedWeight
from .shard_check import DTYPE_BYTES

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# vLLM's loaders name every scale so: weight_scale, input_scale, k_scale, v_scale (compressed-tensors),
# scales (GPTQ, AWQ).
SCALE_SUFFIXES = ("scale", "scales")
E8M0_NAN = 255
"""The one E8M0 code that is not a power of two (uint8 scales are E8M0 exponents: MXFP4)."""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. Integers always are; float8 codes are not checked: they
    are a weight over its scale, clamped, so they are finite when the weight (checked as it is
    loaded) and the scale (`check_quantized`) are, and widening every FP8 code of a 70B model to
    look would cost minutes of export.

    The smallest and largest element say it (aminmax propagates NaN, and an Inf is an extreme):
    one pass and no mask the size of the tensor, ~30x faster than ``isfinite(t).all()`` on a
    CPU's bfloat16 (the embedding and lm_head checked before the first layer took 6 s of a
    Qwen3-30B-A3B run here)."""
    if not t.is_floating_point() or t.dtype in _FLOAT8 or not t.numel():
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def damaged_source_error(name: str, file: Path) -> NumericsError:
    return NumericsError(f"model: tensor {name} in {file} contains NaN or Inf", field="model.id", value=name, file=file,
                         hint="the checkpoint is damaged (re-download or re-convert it)")


def check_source_tensors(source, names: list[str], device: torch.device, chunk_bytes: int = 64 << 20) -> None:
    """Refuse non-finite values in the named tensors of ``source`` (a `ModelSource`), checked on
    ``device`` (a GPU checks a 70B's embedding and lm_head in the time it takes to read them):
    read in bulk where its reader reads so, else in row chunks of about ``chunk_bytes`` (host
    memory holds one chunk of a 2 GB embedding)."""
    names = list(dict.fromkeys(names))  # a tied lm_head is the embedding: read it once
    if device.type in ShardReader.BULK_DEVICES:
        with source.reader() as r, contextlib.closing(r.stream(names, device, None)) as tensors:
            for name, t in tensors:  # each checked as it arrives: the device holds one at a time
                if not all_finite(t):
                    raise damaged_source_error(name, source.path / source.weight_map[name])
        return
    for name in names:
        path = source.path / source.weight_map[name]
        with safe_open(path, framework="pt") as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            if not shape:
                ok = all_finite(f.get_tensor(name))
            else:
                rows = max(1, chunk_bytes // (DTYPE_BYTES.get(part.get_dtype(), 8) * max(1, _numel(shape[1:]))))
                ok = all(all_finite(part[i:i + rows].to(device)) for i in range(0, shape[0], rows))
        if not ok:
            raise damaged_source_error(name, path)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_quantized(prefix: str, qw: QuantizedWeight) -> None:
    """A quantized Linear's scales must be finite and positive (right after quantizing it): group,
    block and E8M0 scales as the float values they stand for, and the global scales of tensor
    groups (NVFP4), which divide them."""
    for field in ("scale", "input_scale", "global_scale", "input_global_scale"):
        t = getattr(qw, field)
        if t is not None:
            _check_scale(f"{prefix}.{field}", t)


def check_quantized_stack(prefixes: list[str], qws: list[QuantizedWeight], stack: QuantizedWeight) -> None:
    """`check_quantized` over Linears packed as one stack (``stack`` holds ``qws`` along a leading
    dim): one reduction a field, and on failure the check of each names the Linear."""
    _check_stack(lambda: check_quantized(prefixes[0], stack),
                 (lambda p=p, q=q: check_quantized(p, q) for p, q in zip(prefixes, qws)))


def check_written_stack(names: list[str], t: torch.Tensor) -> None:
    """`check_written` over tensors of one kind stacked along dim 0 (entry ``i`` is ``names[i]``):
    one reduction, and on failure the check of each names the tensor."""
    _check_stack(lambda: check_written(names[0], t),
                 (lambda n=n, part=part: check_written(n, part) for n, part in zip(names, t)))


def _check_stack(whole: Callable[[], None], each: Iterable[Callable[[], None]]) -> None:
    """Run ``whole``; when it fails, the first of ``each`` that fails raises (naming its part)."""
    try:
        whole()
    except NumericsError:
        for check in each:
            check()
        raise


def check_written(name: str, t: torch.Tensor) -> None:
    """What the checkpoint writer refuses to store: non-finite floats, and scales that are not positive."""
    if not all_finite(t):
        raise NumericsError(f"{name} contains NaN or Inf; the checkpoint would be broken", file=name,
                            hint="check the model's weights; nothing was published")
    if t.is_floating_point() and name.endswith(SCALE_SUFFIXES):
        _check_scale(name, t)
    elif t.dtype == torch.uint8 and name.endswith(SCALE_SUFFIXES) and bool((t == E8M0_NAN).any()):
        raise NumericsError(f"{name}: a scale is NaN (E8M0 code {E8M0_NAN}); the checkpoint would be broken",
                            file=name, value=E8M0_NAN,
                            hint="check the model's weights for NaN/Inf; nothing was published")


def _check_scale(name: str, t: torch.Tensor) -> None:
    t = t.float()  # scales are small; float32 compares any stored dtype
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        value = t.reshape(-1)[bad.reshape(-1).nonzero()[0]].item()
        raise NumericsError(f"{name}: a scale is {value} (scales must be finite and positive); the checkpoint "
                            "would be broken", file=name, value=value,
                            hint="check the model's weights for NaN/Inf or all-zero groups; nothing was published")
