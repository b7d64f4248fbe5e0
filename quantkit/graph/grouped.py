"""Many experts' Linears as one grouped matrix product over their tokens sorted by expert.

The routed forward of a 128-expert block calls ~9 kernels per picked expert per batch; on a GPU
that is launch-bound (Qwen3-30B-A3B's propagate: ~0.9 s a layer, slower than the all-expert
calibration forward of 16x its FLOPs). ``grouped_linear`` does one projection of a run of
experts in one ``grouped_mm`` (torch >= 2.9) over the rows ``[T, K]`` of every expert's tokens,
back to back in expert order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

GROUPED_CHUNK_BYTES = 1 << 30
"""Most bytes of expert parameters stacked at once for the grouped products. The stack is a
copy: DeepSeek-V3's 256 experts are 22 GB a layer in bf16, which must not be held twice on the
device; 1 GiB keeps a chunk's kernels large (Qwen3-30B-A3B: 113 of its 128 experts a chunk,
DeepSeek-V3: 12) while the copy stays small next to the layer."""

_GROUPED_MM: Callable[..., torch.Tensor] | None = getattr(torch.nn.functional, "grouped_mm", None) or getattr(
    torch, "_grouped_mm", None)
_TAKES: dict[tuple[str, torch.dtype], bool] = {}


def _device_takes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's grouped kernel runs ``dtype`` on ``device``'s type at all (CUDA: bf16
    on SM >= 80 only; the CPU fallback: float32, bf16, float16). Tried once on a tiny product,
    as torch versions differ in what they take."""
    key = (device.type, dtype)
    if key not in _TAKES:
        if _GROUPED_MM is None or (device.type == "cuda" and dtype != torch.bfloat16):
            _TAKES[key] = False
        else:
            a = torch.zeros(8, 8, dtype=dtype, device=device)
            b = torch.zeros(1, 8, 8, dtype=dtype, device=device)
            try:
                _GROUPED_MM(a, b, offs=torch.full((1,), 8, dtype=torch.int32, device=device))
                _TAKES[key] = True
            except (RuntimeError, NotImplementedError):
                _TAKES[key] = False
    return _TAKES[key]


def grouped_takes(x: torch.Tensor, widths: Sequence[int]) -> bool:
    """Whether the grouped kernel takes ``x``'s dtype on its device with these matrix widths
    (CUDA reads 16-byte-aligned rows only: every width a whole number of 16 bytes)."""
    if x.is_meta or not _device_takes(x.device, x.dtype):
        return False
    return x.device.type != "cuda" or all(w * x.element_size() % 16 == 0 for w in widths)


def expert_spans(num_experts: int, expert_bytes: int, budget: int) -> list[range]:
    """Consecutive runs of experts whose parameters take at most ``budget`` bytes (one expert
    at least)."""
    per = max(1, budget // max(1, expert_bytes))
    return [range(lo, min(lo + per, num_experts)) for lo in range(0, num_experts, per)]


def grouped_linear(x: torch.Tensor, linears: Sequence[nn.Linear], offs: torch.Tensor,
                   expert_of_row: torch.Tensor | None) -> torch.Tensor:
    """``linears[g](x[rows of g])`` for every group ``g`` at once: group ``g`` holds the rows up
    to ``offs[g]`` (int32, cumulative ends; a group may be empty). ``expert_of_row``: each
    row's index into ``linears``, for their biases (None without biases).

    Without a bias the result is each Linear's on CPU (torch's fallback is a matmul per
    group), bitwise where MKL sums both products alike, which on AVX-512 machines it did not for
    every shape (a last-bit difference); a bias is added after the product here, where
    ``nn.Linear`` fuses it into the matmul (``addmm``): one rounding apart."""
    weight = torch.stack([m.weight for m in linears]).transpose(1, 2)  # [G, K, N]: each W.T
    y = _GROUPED_MM(x, weight, offs=offs)
    if expert_of_row is not None:
        y += torch.stack([m.bias for m in linears])[expert_of_row]
    return y
