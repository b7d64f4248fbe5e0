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

from .types import LayerGraph


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
