"""Which elements of a 2-D tensor share one scale: the one place that knows scale layouts.

A weight ``[out, in]`` or a flattened activation ``[tokens, in]`` is quantized with scales
laid out as one of:

  - ``tensor``: one scale, shape ``[1]``;
  - ``row``: one per row (a weight's output channel, an activation's token), ``[rows, 1]``;
  - ``group``: one per row and run of ``group`` columns, ``[rows, cols / group]`` (NVFP4's
    tensor groups too: their global scale is a separate scalar);
  - ``block``: one per ``block[0] x block[1]`` tile, ``[ceil(rows / b0), ceil(cols / b1)]``
    (edge tiles are partial, as compressed-tensors pads them).

``reduce`` takes a statistic over the elements of each scale entry (what RTN, GPTQ's column
groups, observers and dynamic activation quantization need) and ``expand`` broadcasts a
tensor of that layout back to one value per element (what dequantization and rounding need).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

LayoutKind = Literal["tensor", "row", "group", "block"]


@dataclass(frozen=True)
class ScaleLayout:
    kind: LayoutKind
    group: int | None = None
    block: tuple[int, int] | None = None

    def shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.kind == "tensor":
            return (1,)
        if self.kind == "row":
            return (rows, 1)
        if self.kind == "group":
            if cols % self.group:
                raise ValueError(f"{cols} columns are not a multiple of group size {self.group}")
            return (rows, cols // self.group)
        b0, b1 = self.block
        return (math.ceil(rows / b0), math.ceil(cols / b1))

    def reduce(self, x: torch.Tensor, op: Callable[..., torch.Tensor] = torch.amax) -> torch.Tensor:
        """``op`` (``torch.amax`` or ``torch.amin``) over each scale entry's elements of
        ``x`` ``[rows, cols]``; float32 in this layout's shape. Block edges are padded with
        zeros, which no amax or (zero-including) min/max range is changed by."""
        rows, cols = x.shape
        x = x.to(torch.float32)
        if self.kind == "tensor":
            return op(x).reshape(1)
        if self.kind == "row":
            return op(x, dim=1, keepdim=True)
        if self.kind == "group":
            return op(x.reshape(rows, cols // self.group, self.group), dim=2)
        b0, b1 = self.block
        r, c = self.shape(rows, cols)
        padded = torch.nn.functional.pad(x, (0, c * b1 - cols, 0, r * b0 - rows))
        return op(padded.reshape(r, b0, c, b1), dim=(1, 3))

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(x.abs())

    def expand(self, t: torch.Tensor, rows: int, cols: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` in this layout broadcast to ``[rows, cols]``. ``g_idx`` (group layout only)
        gives each column's group when act-order permuted them."""
        if self.kind == "tensor":
            return t.reshape(1, 1).expand(rows, cols)
        if self.kind == "row":
            return t.reshape(rows, 1).expand(rows, cols)
        if self.kind == "group":
            if g_idx is not None:
                return t[:, g_idx.long()]
            return t.repeat_interleave(self.group, dim=1)
        b0, b1 = self.block
        return t.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]

    def split_rows(self, t: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
        """Split ``t`` (this layout over stacked weights) into the parts of weights of ``rows``
        rows each; a tensor scale is shared. Blocks must not straddle two weights."""
        if self.kind == "tensor":
            return [t.clone() for _ in rows]
        if self.kind == "block":
            if any(r % self.block[0] for r in rows[:-1]):
                raise ValueError(f"row blocks of {self.block[0]} straddle weights of {rows} rows")
            return list(torch.split(t, [math.ceil(r / self.block[0]) for r in rows]))
        return list(torch.split(t, rows))
