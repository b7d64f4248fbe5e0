"""How channels flow from a producer to a consumer, read off recorded runs.

Pure functions over the tensors a ``trace.run_layer`` recorded: which views a Linear's
output is cut into, whether scaling a producer's channels scales a consumer's input channel
for channel (and which channel), and how a norm takes a per-channel scale or a rotation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..rotation.hadamard import random_hadamard
from .trace import LayerRun
from .types import ChannelMap

# A true identity leaves ~1e-14 in float64, but many norms compute in float32 whatever the
# input dtype (Llama's RMSNorm, Gemma's 1 + w, Cohere's LayerNorm): ~1e-7 there. A wrong rule
# leaves ~1e-1.
EXACT_RTOL = 1e-6


def tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def channel_mask(grad: torch.Tensor | None, n: int) -> torch.Tensor:
    if grad is None:
        return torch.zeros(n, dtype=torch.bool)
    return rows(grad).abs().amax(0) > 0


def flow(base: torch.Tensor, probe: torch.Tensor, r: torch.Tensor) -> tuple[str, torch.Tensor | None]:
    """How scaling a producer's channels by ``r`` changed a consumer input:
    ``"none"``, ``"map"`` (each consumer channel is one producer channel times its factor;
    the map is returned) or ``"mixed"``."""
    x, y = rows(base).detach(), rows(probe).detach()
    if torch.equal(x, y):
        return "none", None
    big = x.abs() > 1e-9 * x.abs().max()
    if not bool(big.any(0).all()):
        return "mixed", None
    ratio = torch.where(big, y / torch.where(big, x, torch.ones_like(x)), torch.nan)
    hi = torch.nan_to_num(ratio, nan=-torch.inf).amax(0)
    lo = torch.nan_to_num(ratio, nan=torch.inf).amin(0)
    rho = (hi + lo) / 2
    if not bool(((hi - lo) <= 1e-9 * rho.abs()).all()):
        return "mixed", None
    order = torch.argsort(r)
    pos = torch.searchsorted(r[order], rho).clamp(max=r.shape[0] - 1)
    cand = torch.stack([pos, (pos - 1).clamp(min=0)])
    err = (r[order][cand] - rho).abs()
    best = err.argmin(0)
    idx = order[cand.gather(0, best.unsqueeze(0)).squeeze(0)]
    if not bool((err.gather(0, best.unsqueeze(0)).squeeze(0) <= 1e-9 * rho.abs()).all()):
        return "mixed", None
    return "map", idx


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def segments_of(run: LayerRun, outputs: dict[str, torch.Tensor]) -> dict[str, list[tuple[int, int]]]:
    """For each Linear output, the row ranges its consumers take as last-dim slices of it
    (works on meta tensors too: views are matched through their base, not their memory)."""
    spans: dict[str, list[tuple[int, int]]] = {n: [] for n in outputs}
    roots = {id(_root(o)): n for n, o in outputs.items()}
    for op in run.ops:
        for t in op.outputs:
            n = roots.get(id(_root(t)))
            if n is None:
                continue
            base = outputs[n]
            if t.dim() == base.dim() and t.shape[:-1] == base.shape[:-1] and t.shape[-1] < base.shape[-1] \
                    and t.stride() == base.stride():
                start = t.storage_offset() - base.storage_offset()
                spans[n].append((start, start + t.shape[-1]))
    out = {}
    for n, found in spans.items():
        width = outputs[n].shape[-1]
        cuts = sorted({0, width} | {a for a, _ in found} | {b for _, b in found})
        out[n] = list(zip(cuts[:-1], cuts[1:]))
    return out


def channel_map(pi: torch.Tensor, start: int, head_dims: set[int]) -> ChannelMap | None:
    n = pi.shape[0]
    if torch.equal(pi, torch.arange(n)):
        return ChannelMap(start=start)
    for d in sorted(head_dims):
        producers = int(pi.max()) + 1
        if n % producers or producers % d:
            continue
        cm = ChannelMap(start=start, group=n // producers, head_dim=d)
        if torch.equal(pi, cm.index(n)):
            return cm
    return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def norm_weight_kind(mod: nn.Module, dim: int, gen: torch.Generator) -> str:
    """``norm`` if the output scales with the weight (x̂·w), ``offset_norm`` if with 1 + w
    (x̂·(1+w)), else ``unfoldable`` — tested on the module alone with random inputs."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return "unfoldable"
    x = torch.randn(3, 5, dim, dtype=w.dtype, generator=gen)
    r = 0.5 + torch.rand(w.shape, dtype=w.dtype, generator=gen)
    with torch.no_grad():
        base = mod(x)
        for kind, new_w in (("norm", w * r), ("offset_norm", (1 + w) * r - 1)):
            m = copy.deepcopy(mod)
            m.weight.copy_(new_w)
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(r)
            if rel_err(m(x), base * r) <= EXACT_RTOL:
                return kind
    return "unfoldable"


def rotation_invariant(mod: nn.Module, kind: str, dim: int, gen: torch.Generator) -> bool:
    """The norm with a neutral weight commutes with an orthogonal rotation (RMS norms do;
    mean-centring LayerNorms and biased norms do not). Tested with a randomized Hadamard, as the
    stream rotation uses: it maps the all-ones direction onto one axis, so centring fails the
    test, and it costs O(n²) where the QR of a Gaussian took 1.5 s at Llama-3.1-8B's width on
    the CPU, twice a run (docs/quality.md, stop 45)."""
    if getattr(mod, "bias", None) is not None:
        return False
    m = copy.deepcopy(mod)
    with torch.no_grad():
        m.weight.fill_(0.0 if kind == "offset_norm" else 1.0)
        x = torch.randn(3, 5, dim, dtype=m.weight.dtype, generator=gen)
        q = random_hadamard(dim, gen).to(m.weight.dtype)
        return rel_err(m(x @ q), m(x) @ q) <= EXACT_RTOL
