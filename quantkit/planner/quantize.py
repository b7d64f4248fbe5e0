"""The device memory quantkit needs to quantize a model's largest decoder layer (GPTQ, the
largest statistics of any method), Mixture-of-Experts layers included, per device of a run
on one or several GPUs."""

from __future__ import annotations

from dataclasses import dataclass

from .shape import ModelShape


@dataclass(frozen=True)
class QuantizeMemory:
    """Device memory quantkit needs to GPTQ-quantize one decoder layer (its largest), bytes."""

    layer: int  # the layer's weights in 16 bits
    codes: int  # its codes (one byte per weight) held until the layer is saved
    hessians: int  # float32, one per input group (every expert's gate/up share one); owned experts' only
    solve: int  # GPTQ's working set: a stacked chunk, its errors, the inverse Hessian factor
    activations: int  # the calibration hidden states, 16 bits (and a replayed rank's share of a MoE block's)
    per_expert_hessians: int  # what one Hessian per expert Linear would take instead (routed calibration)

    @property
    def total(self) -> int:
        return self.layer + self.codes + self.hessians + self.solve + self.activations


def quantize_memory(shape: ModelShape, samples: int = 128, seq_len: int = 2048, gpus: int = 1) -> QuantizeMemory:
    """The quantization-time need of the largest layer (a MoE layer when there is one), under
    all-expert calibration, which lets every expert's gate/up share one Hessian, per device of
    a run on ``gpus`` (``quantkit run --gpus``): each holds its share of the calibration
    batches and only the statistics of the experts it owns (the layer's weights, the other
    statistics and the codes of every Linear are on every device), plus one rank's share of a
    MoE block's inputs while they are replayed through its experts."""
    h, hd = shape.hidden_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    attention = 2 * h * q + 2 * h * kv
    hess = h * h + q * q  # q/k/v share one; o_proj its own
    share = -(-samples // gpus)
    replay = 0
    if shape.moe_layers:
        e, i, sh = shape.num_experts, shape.moe_intermediate_size, shape.shared_intermediate_size
        owned = -(-e // gpus)
        mlp = 3 * h * (e * i + sh)
        hess += h * h + owned * i * i + sh * sh
        stacked = 2 * h * (e * i + sh)
        separate = owned * (2 * h * h + i * i) + sh * sh + h * h
        extra = e * h
        replay = 2 * share * seq_len * h if gpus > 1 else 0
    else:
        i = shape.intermediate_size
        mlp = 3 * h * i
        hess += h * h + i * i
        stacked = 2 * h * i
        separate = hess
        extra = 0
    params = attention + mlp
    chunk = min(stacked, 1 << 28)
    big = max(h, i, q)
    return QuantizeMemory(
        layer=2 * (params + extra),
        codes=params,
        hessians=4 * hess,
        solve=4 * (2 * chunk + 2 * big * big),
        activations=2 * share * seq_len * h + replay,
        per_expert_hessians=4 * (separate + q * q + h * h) if shape.moe_layers else 4 * hess,
    )
