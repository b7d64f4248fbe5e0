"""Shared builders for the format tests: fresh random QuantizedWeights for a scheme."""

from __future__ import annotations

import torch

from quantkit.quantizers.rtn import quantize_rtn
from quantkit.scheme import ActivationScheme, QuantizedWeight, Scheme, WeightScheme


def w4(sym: bool = True, group: int | None = 32, actorder: str | None = None, bits: int = 4) -> Scheme:
    strategy = "group" if group else "channel"
    return Scheme(WeightScheme(num_bits=bits, symmetric=sym, strategy=strategy, group_size=group, actorder=actorder))


def int8_w8a8(strategy: str = "channel", act: str = "token", dynamic: bool = True) -> Scheme:
    return Scheme(
        WeightScheme(num_bits=8, strategy=strategy, group_size=None),
        ActivationScheme(strategy=act, dynamic=dynamic),
    )


def fp8(strategy: str = "channel", act: str | None = "token", dynamic: bool = True) -> Scheme:
    acts = None if act is None else ActivationScheme(type="float", strategy=act, dynamic=dynamic)
    return Scheme(WeightScheme(num_bits=8, type="float", strategy=strategy, group_size=None), acts)


def make_qw(scheme: Scheme, seed: int, out_f: int = 64, in_f: int = 128, permute: bool = False) -> QuantizedWeight:
    """RTN-quantized random weight; ``permute`` gives it an act-order g_idx with permuted groups."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05 + 0.01 * torch.randn(out_f, 1, generator=gen)
    qw = quantize_rtn(w, scheme)
    if not scheme.weight_only:
        qw.input_scale = torch.rand(1, generator=gen) + 0.01
        if scheme.input_activations.has_global_scale:
            qw.input_global_scale = torch.rand(1, generator=gen) * 1000 + 1
    if permute:
        g = scheme.weights.group_size
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // g).to(torch.int32)
        qw.g_idx = g_idx
    return qw


def with_scale_dtype(qw: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    """``qw`` with its scale rounded through ``dtype``, as a checkpoint storing ``dtype`` holds it
    (E4M3 and E8M0 scales are exact in theirs)."""
    exact = dtype in (torch.float8_e4m3fn, torch.uint8)
    return QuantizedWeight(
        codes=qw.codes,
        scale=qw.scale if exact else qw.scale.to(dtype).to(torch.float32),
        global_scale=qw.global_scale,
        input_global_scale=qw.input_global_scale,
        zero_point=qw.zero_point,
        scheme=qw.scheme,
        g_idx=qw.g_idx,
        input_scale=qw.input_scale,
    )
