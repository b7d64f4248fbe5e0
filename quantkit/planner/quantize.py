"""The device memory quantkit needs to quantize a model's largest decoder layer, Mixture-of-Experts
layers included, per device of a run on one or several GPUs, for the quantizer a recipe names
(``Calibrating.of``) or, without one, the shipped 4-bit recipes' (``SHIPPED_4BIT``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .shape import ModelShape


@dataclass(frozen=True)
class Calibrating:
    """What a quantizer keeps on the device while it calibrates one layer, as the plan counts it."""

    recipe: str  # where the quantizer comes from, as the plan names it
    method: str
    statistics: tuple[str, ...]  # the float32 [in, in] matrices per input group, by what each is
    float_stream: bool  # the float model's calibration stream kept beside the quantized one
    target_matrices: int = 0  # float32 [in, in] a stack's target takes at its peak, before its solve
    sequential: bool = False  # calibrated in stages, the quantized stages' weights put into the layer
    samples: int = 128
    seq_len: int = 2048
    batch: int = 8  # sequences per forward pass

    @classmethod
    def of(cls, quantizer: Any, samples: int, seq_len: int, recipe: str, batch: int = 8) -> "Calibrating":
        """A built ``Quantizer``'s needs (``statistics``, ``needs_float_inputs``,
        ``target_matrices``, GPTQ's ``sequential``) with its recipe's calibration size; one that
        calibrates nothing keeps no statistic nor stream."""
        method = quantizer.params.method
        if not quantizer.needs_calibration:
            return cls(recipe, method, (), False, 0, False, 0, 0, 0)
        return cls(recipe, method, tuple(quantizer.statistics), quantizer.needs_float_inputs,
                   quantizer.target_matrices, getattr(quantizer.params, "sequential", False), samples, seq_len, batch)

    @classmethod
    def of_recipe(cls, recipe: Any, config: dict[str, Any]) -> "Calibrating":
        """What the quantizer of ``recipe`` (a loaded ``RecipeBase``) keeps while it calibrates
        the model of ``config`` (imports the quantizers, hence torch)."""
        from ..quantizers import QUANTIZERS

        params, cal = recipe.quantization, recipe.calibration
        return cls.of(QUANTIZERS[params.method](params, config), cal.num_samples, cal.max_seq_length, recipe.where,
                      cal.batch_size)


# GPTQ with input_feedback (GPTAQ), sequential, as the built-in default sets it: the largest need of
# any shipped method, which a plan without a recipe counts (tests check it against the recipe's quantizer).
SHIPPED_4BIT = Calibrating("the shipped 4-bit recipes", "gptq",
                           ("the quantized inputs' Hessian", "its cross term with the float inputs"), True, 5, True)


@dataclass(frozen=True)
class QuantizeMemory:
    """Device memory quantkit needs to quantize one decoder layer (its largest), bytes."""

    calibrating: Calibrating
    layer: int  # the layer's weights in 16 bits
    codes: int  # its codes (one byte per weight) held until the layer is saved
    hessians: int  # float32, len(statistics) per input group (every expert's gate/up share them); owned experts' only
    solve: int  # GPTQ's working set (a stacked chunk, its errors, the inverse Hessian factor) or a target's, the larger
    activations: int  # the calibration hidden states, 16 bits (and a replayed rank's share of a MoE block's)
    float_activations: int  # the same again for the float model's stream, when the quantizer keeps it
    paired_inputs: int  # with it, one batch's float-stream input to every input group, 16 bits, kept for the pairing
    per_expert_hessians: int  # what they take under routed calibration (per expert: gate/up, down_proj)
    substitutes: int = 0  # sequential: the quantized stages' weights in 16 bits, and the float ones put aside

    @property
    def total(self) -> int:
        """The solves run after the calibration passes: a pass's paired inputs and a solve's
        working set are never alive together, so only the larger counts."""
        return (self.layer + self.codes + self.hessians + self.activations + self.float_activations
                + self.substitutes + max(self.solve, self.paired_inputs))


def quantize_memory(shape: ModelShape, calibrating: Calibrating = SHIPPED_4BIT, gpus: int = 1) -> QuantizeMemory:
    """The quantization-time need of the largest layer (a MoE layer when there is one), under
    all-expert calibration, which lets every expert's gate/up share their statistics, per
    device of a run on ``gpus`` (``quantkit run --gpus``): each holds its share of the
    calibration batches (of each stream) and only the statistics of the experts it owns (the
    layer's weights, the other statistics and the codes of every Linear are on every device),
    plus one rank's share of a MoE block's inputs (of each stream) while they are replayed
    through its experts."""
    c = calibrating
    h, hd = shape.hidden_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    attention = 2 * h * q + 2 * h * kv
    hess = h * h + q * q  # q/k/v share one; o_proj its own
    share = -(-c.samples // gpus)
    replay = 0
    if shape.moe_layers:
        e, i, sh = shape.num_experts, shape.moe_intermediate_size, shape.shared_intermediate_size
        owned = -(-e // gpus)
        mlp = 3 * h * (e * i + sh)
        hess += h * h + owned * i * i + sh * sh
        stacked = 2 * h * (e * i + sh)
        # Routed: each expert's gate/up share one, its down_proj its own; a shared expert's two.
        separate = h * h + q * q + owned * (h * h + i * i) + (h * h + sh * sh if sh else 0)
        extra = e * h
        inputs = 2 * h + q + owned * i + sh  # widths the statistics of a pass hook: owned experts' down_proj
        replay = 2 * share * c.seq_len * h if gpus > 1 else 0
    else:
        i = shape.intermediate_size
        mlp = 3 * h * i
        hess += h * h + i * i
        stacked = 2 * h * i
        separate = hess
        extra = 0
        inputs = 2 * h + q + i
    params = attention + mlp
    chunk = min(stacked, 1 << 28)
    big = max(h, i, q, shape.shared_intermediate_size)  # the widest input
    matrices = len(c.statistics)
    stream = 2 * share * c.seq_len * h + replay
    return QuantizeMemory(
        calibrating=c,
        layer=2 * (params + extra),
        codes=params,
        hessians=4 * matrices * hess,
        solve=max(4 * (2 * chunk + 2 * big * big), 4 * c.target_matrices * big * big) if matrices else 0,
        activations=stream,
        float_activations=stream if c.float_stream else 0,
        paired_inputs=2 * min(c.batch, share) * c.seq_len * inputs if c.float_stream else 0,
        per_expert_hessians=4 * matrices * separate,
        # At most every Linear but the last stage's, counted as all of them.
        substitutes=2 * 2 * params if c.sequential else 0,
    )
