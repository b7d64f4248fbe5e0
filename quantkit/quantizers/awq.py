"""AWQ (Lin et al., 2024): activation-aware per-channel scaling before group quantization.

Per input group: ``s = mean|x|^ratio`` (normalised), with the ratio picked on a grid in
[0, 1) to minimise ``Σ_linears ||X Wᵀ − (X/s) Q(W·s)ᵀ||²`` on captured tokens; ``s`` is
folded into the producer the layer graph names (norm weight, Gemma's 1 + w, or v/up output
rows, also as row slices of fused projections) so the float layer is unchanged; then each weight's per-group clipping range is shrunk on a grid to minimise its
output error, and the weight is round-to-nearest quantized. Ratio 0 is plain RTN, so on the
captured tokens AWQ is never worse than RTN.

Memory: captured inputs are a uniform sample of at most ``max_calib_tokens`` rows per group
(kept in the activation dtype); losses are summed over token chunks (``[chunk, out]``
buffers), and the clip search works on per-group Gram matrices (``[in/g, g, g]``), chunked
over output rows. Nothing is ``[grid, tokens, out]``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from ..graph.fold import fold_scales
from ..graph.types import LayerGraph
from ..scheme import QuantizedWeight, Scheme
from ..distributed import World
from .base import Joined, LayerCalibration, Quantizer, QuantizerParams, register_quantizer, solve_units
from .rtn import quantize_rtn, weight_only_scheme
from .clip import MAX_SHRINK, clip_to_gram
from .sampling import RowSample

# Chunk sizes bound temporary buffers to about this many float32 elements (128 MiB).
_CHUNK_ELEMS = 1 << 25
# The clip search skips units with query or key rows (q_proj, k_proj, a fused qkv_proj), as
# AutoAWQ does: their error shows up in attention scores, which a Linear-output loss does
# not measure.
_NO_CLIP = ("q", "k")


class ChannelAbsMean:
    """Running mean of ``|x|`` per input channel (``channels`` of them) over every
    calibration token."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        s = x.detach().abs().to(torch.float32).sum(dim=0)
        self.total = s if self.total is None else self.total + s
        self.count += x.shape[0]

    def reduce(self, world: World) -> None:
        """Sums and counts added over the ranks."""
        if world.size > 1:
            if self.total is None:  # none of this rank's tokens reached it (an expert no token picked)
                self.total = torch.zeros(self.channels, device=world.device)
            world.all_reduce(self.total)
            self.count = int(world.all_reduce(torch.tensor([float(self.count)], dtype=torch.float64,
                                                           device=self.total.device)).item())

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` ``[in, in]`` in float32, summed over token chunks."""
    in_f = x.shape[1]
    g = torch.zeros(in_f, in_f, device=x.device, dtype=torch.float32)
    chunk = max(1, _CHUNK_ELEMS // in_f)
    for t in range(0, x.shape[0], chunk):
        xc = x[t : t + chunk].to(torch.float32)
        g.addmm_(xc.T, xc)
    return g


def output_sq_error(x: torch.Tensor, dw: torch.Tensor, x_gram: torch.Tensor | None = None) -> torch.Tensor:
    """``||X ΔWᵀ||²``, float32 scalar. With ``x_gram`` (``XᵀX``) as ``Σ (ΔW·XᵀX) ∘ ΔW``:
    ``out·in²`` work instead of ``tokens·in·out``, the cheaper one when tokens outnumber
    input channels (the grid search evaluates it 20 times per Linear)."""
    if x_gram is not None:
        return ((dw @ x_gram) * dw).sum()
    chunk = max(1, _CHUNK_ELEMS // max(dw.shape[0], dw.shape[1]))
    total = torch.zeros((), device=dw.device, dtype=torch.float32)
    for t in range(0, x.shape[0], chunk):
        total += (x[t : t + chunk].to(torch.float32) @ dw.T).pow(2).sum()
    return total


def awq_scale_search(
    weights: Sequence[torch.Tensor], x: torch.Tensor, x_mean: torch.Tensor, scheme: Scheme, grid: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-input-channel scale ``s`` (float32 ``[in]``) minimising the group's output
    error, and the losses of every ratio ``k/grid`` (``[grid]``; index 0 is RTN)."""
    ws = [w.detach().to(torch.float32) for w in weights]
    xm = x_mean.to(device=ws[0].device, dtype=torch.float32)
    x_gram = gram(x) if x.shape[0] > x.shape[1] else None
    losses, scales = [], []
    for k in range(grid):
        s = xm.pow(k / grid).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = torch.zeros((), device=xm.device)
        for w in ws:
            dq = quantize_rtn(w * s, scheme).dequantize() / s
            loss = loss + output_sq_error(x, w - dq, x_gram)
        losses.append(loss)
        scales.append(s)
    losses_t = torch.stack(losses)
    return torch.stack(scales)[losses_t.argmin()], losses_t


def awq_clip_search(
    w: torch.Tensor, x: torch.Tensor, scheme: Scheme, grid: int = 20, max_shrink: float = MAX_SHRINK
) -> torch.Tensor:
    """``w`` (float32) with each (row, group) clamped to the shrunk range that minimises that
    group's contribution to the output error on ``x`` (``clip_to_gram``)."""
    ws = scheme.weights
    in_f = w.shape[1]
    g = ws.group_size if ws.strategy == "group" and ws.group_size else in_f
    ng = in_f // g
    gram = torch.zeros(ng, g, g, device=w.device, dtype=torch.float32)
    chunk = max(1, _CHUNK_ELEMS // in_f)
    for t in range(0, x.shape[0], chunk):
        xc = x[t : t + chunk].to(torch.float32).reshape(-1, ng, g).transpose(0, 1)  # [ng, T, g]
        gram += xc.transpose(1, 2) @ xc
    return clip_to_gram(w, gram, scheme, grid, max_shrink)


class AWQParams(QuantizerParams):
    """AWQ weight-only quantization; defaults are W4A16 asymmetric, group 128."""

    method: Literal["awq"] = "awq"
    bits: Literal[4, 8] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    symmetric: bool = False
    grid: int = Field(20, ge=2, le=100)
    clip_search: bool = True
    max_calib_tokens: int = Field(4096, ge=16)

    def folds_input_scales(self) -> bool:
        return True

    def scheme(self) -> Scheme:
        return weight_only_scheme(self.bits, self.group_size, self.symmetric)


@register_quantizer("awq")
class AWQQuantizer(Quantizer):
    Params = AWQParams

    def quantize_layer(self, layer, graph: LayerGraph, calib: LayerCalibration, schemes=None) -> dict[str, QuantizedWeight]:
        p: AWQParams = self.params  # type: ignore[assignment]
        names = self.schemes_or_default(graph, schemes)
        dtype = next(layer.parameters()).dtype  # the calibration inputs' (the model's compute dtype)
        samples = {g.key: RowSample(p.max_calib_tokens, calib.generator(g.key),
                                    torch.empty(0, graph.unit(g.key).in_features, dtype=dtype))
                   for g in graph.groups}
        means = {g.key: ChannelAbsMean(graph.unit(g.key).in_features) for g in graph.groups}
        # One pass over the float layer: folding keeps the float function, so the inputs
        # captured here stay valid (divided by s) after every group is scaled.
        calib.observe({k: Joined(samples[k], means[k]) for k in samples})

        def search(g) -> tuple[dict[str, torch.Tensor], dict]:
            weights = [graph.unit(n).matrix(layer) for n in g.linears]
            s, _ = awq_scale_search(weights, samples[g.key].rows(), means[g.key].mean(), self.scheme, p.grid)
            return {"scale": s}, {}

        foldable = {g.key: g for g in graph.groups if g.foldable}
        scales = calib.world.solve({
            k: (float(p.grid) * sum(graph.unit(n).out_features for n in g.linears) * graph.unit(k).in_features ** 2,
                lambda g=g: search(g))
            for k, g in foldable.items()})
        x_div: dict[str, torch.Tensor] = {}
        for k, g in foldable.items():  # on every rank: each propagates through the folded layer
            x_div[k] = scales[k][0]["scale"]
            fold_scales(layer, g, x_div[k])

        def clip_and_round(g, name: str) -> dict[str, QuantizedWeight]:
            unit = graph.unit(name)
            w = unit.matrix(layer).detach().to(torch.float32)
            if p.clip_search and not set(unit.roles) & set(_NO_CLIP):
                x = samples[g.key].rows()
                if g.key in x_div:
                    x = x.to(torch.float32) / x_div[g.key]
                w = awq_clip_search(w, x, self.scheme, p.grid)
            return {name: quantize_rtn(w, self.scheme)}

        jobs = {}
        for g in graph.groups:
            tokens = samples[g.key].count
            for name in (n for n in g.linears if n in names):
                u = graph.unit(name)
                jobs[name] = (float(u.in_features) * (u.out_features * p.grid + tokens) * 128,
                              lambda g=g, name=name: clip_and_round(g, name))
        return solve_units(calib.world, jobs)
