"""The device memory quantkit needs to quantize a model's largest decoder layer (GPTQ, the
largest statistics of any method), Mixture-of-Experts layers included."""

from __future__ import annotations

from dataclasses import dataclass

from .shape import ModelShape


@dataclass(frozen=True)
class QuantizeMemory:
    """Device memory quantkit needs to GPTQ-quantize one decoder layer (its largest), bytes."""

    layer: int  # the layer's weights in 16 bits
    codes: int  # its codes (one byte per weight) held until the layer is saved
    hessians: int  # float32, one per input group (every expert's gate/up share one)
    solve: int  # GPTQ's working set: a stacked chunk, its errors, the inverse Hessian factor
    activations: int  # the calibration hidden states, 16 bits
    per_expert_hessians: int  # what one Hessian per expert Linear would take instead (routed calibration)

    @property
    def total(self) -> int:
        return self.layer + self.codes + self.hessians + self.solve + self.activations


def quantize_memory(shape: ModelShape, samples: int = 128, seq_len: int = 2048) -> QuantizeMemory:
    """The quantization-time need of the largest layer (a MoE layer when there is one), under
    all-expert calibration, which lets every expert's gate/up share one Hessian."""
    h, hd = shape.hidden_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    attention = 2 * h * q + 2 * h * kv
    hess = h * h + q * q  # q/k/v share one; o_proj its own
    if shape.moe_layers:
        e, i, sh = shape.num_experts, shape.moe_intermediate_size, shape.shared_intermediate_size
        mlp = 3 * h * (e * i + sh)
        hess += h * h + e * i * i + sh * sh
        stacked = 2 * h * (e * i + sh)
        separate = 2 * e * h * h + e * i * i + sh * sh + h * h
        extra = e * h
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
        activations=2 * samples * seq_len * h,
        per_expert_hessians=4 * (separate + q * q + h * h) if shape.moe_layers else 4 * hess,
    )
