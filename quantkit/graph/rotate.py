"""Rotating the residual stream through one decoder layer (QuaRot/SpinQuant's invariance).

With the stream ``x`` replaced by ``x Q`` (``Q`` orthogonal), a layer whose readers are
RMS-type norms and whose writers are Linear rows computes ``layer(x) Q`` once each reader's
norm weight is folded into the Linears it feeds (``W ← W diag(w)``, the norm left neutral),
every reader Linear takes ``W ← W Q`` and every writer ``W ← Qᵀ W`` (bias ``b ← b Q``).
Only layers whose graph says ``rotatable`` may be rotated; this is what issue 20 builds on.
"""

from __future__ import annotations

import torch
from torch import nn

from .types import InputGroup, LayerGraph


@torch.no_grad()
def absorb_reader_norms(layer: nn.Module, graph: LayerGraph) -> None:
    """Fold each reader norm's weight into its consumers' input columns and leave the norm
    neutral (weight 1, or 0 for ``1 + w`` norms): the layer's function is unchanged."""
    for r in graph.readers:
        if r.kind not in ("norm", "offset_norm"):
            continue
        norm = layer.get_submodule(r.module)
        w = norm.weight.to(torch.float64)
        eff = 1 + w if r.kind == "offset_norm" else w
        for name in r.consumers:
            lin = layer.get_submodule(name).weight
            lin.copy_((lin.to(torch.float64) * eff).to(lin.dtype))
        norm.weight.fill_(0.0 if r.kind == "offset_norm" else 1.0)


@torch.no_grad()
def rotate_layer(layer: nn.Module, graph: LayerGraph, q: torch.Tensor) -> None:
    """Make ``layer`` compute ``layer(x) @ q`` from ``x @ q``, in place."""
    if not graph.rotatable:
        raise ValueError(f"{graph.layer_class} is not rotatable: {'; '.join(graph.rotation_blockers())}")
    absorb_reader_norms(layer, graph)
    q64 = q.to(torch.float64)
    for r in graph.readers:
        for name in (r.consumers if r.kind != "linear" else (r.module,)):
            w = layer.get_submodule(name).weight
            w.copy_((w.to(torch.float64) @ q64).to(w.dtype))
    for wr in graph.writers:
        lin = layer.get_submodule(wr.module)
        lin.weight.copy_((q64.T @ lin.weight.to(torch.float64)).to(lin.weight.dtype))
        if getattr(lin, "bias", None) is not None:
            lin.bias.copy_((lin.bias.to(torch.float64) @ q64).to(lin.bias.dtype))


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal ``[n, n]`` float64 matrix (QR of a Gaussian, signs fixed)."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    qm, r = torch.linalg.qr(a)
    return qm * torch.sign(torch.diagonal(r)).unsqueeze(0)


@torch.no_grad()
def rotate_heads(layer: nn.Module, group: InputGroup, r: torch.Tensor) -> None:
    """Rotate every head of the values read by ``group`` (o_proj) by ``r`` ``[d, d]``, in place.

    Attention mixes a head's value vectors with one weight per token, so ``v_h ← v_h r`` on
    the producer rows (``W ← rᵀ W``, ``b ← b r``) gives ``o_h r``, undone by ``W_o[:, h] ← W_o[:, h] r``
    on every query head reading that kv head: the layer's function is unchanged.
    """
    p = group.producer
    d = r.shape[0]
    if p.kind != "attention_value" or not p.exact or p.module is None or p.channels.head_dim != d:
        raise ValueError(f"{group.key}: its input is not attention over value heads of size {d}")
    r64 = r.to(torch.float64)
    consumers = [layer.get_submodule(n).weight for n in group.linears]
    n = consumers[0].shape[1]
    rows = slice(p.channels.start, p.channels.start + p.channels.producer_channels(n))
    prod = layer.get_submodule(p.module)
    w = prod.weight[rows]
    heads = w.to(torch.float64).reshape(-1, d, w.shape[1])
    w.copy_(torch.einsum("ji,hjk->hik", r64, heads).reshape(w.shape).to(w.dtype))
    if getattr(prod, "bias", None) is not None:
        b = prod.bias[rows]
        b.copy_((b.to(torch.float64).reshape(-1, d) @ r64).reshape(b.shape).to(b.dtype))
    for wo in consumers:
        cols = wo.to(torch.float64).reshape(wo.shape[0], -1, d) @ r64
        wo.copy_(cols.reshape(wo.shape).to(wo.dtype))
