"""How each precision stores a Linear in vLLM's memory, and the weight bytes of a model in it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import PlanError
from ..gpus import GPU
from .shape import ModelShape, bias_params, linear_shapes, padded_vocab_per_gpu, router_params


Kernel = Literal["bf16", "fp8", "int8", "fp8-block", "fp4", "w4a8-fp8"]

# Where vLLM (0.32) has a native kernel for a scheme's matmul, by compute capability:
#   fp8-block: DeepGEMM / CUTLASS block FP8 exist from Hopper on; on Ada, vLLM's FP8 block
#     kernel list reaches Marlin (weight-only) before Triton (kernels/linear/__init__.py).
#   fp4: NVFP4 and MXFP4 W4A4 kernels (CUTLASS, FlashInfer) need Blackwell.
#   w4a8-fp8: CompressedTensorsW4A8Fp8 is chosen on capability 9.0 exactly (_is_fp8_w4a8_sm90).
_NATIVE = {
    "bf16": lambda g: g.compute_capability >= (8, 0),
    "fp8": lambda g: g.fp8,
    "int8": lambda g: g.int8,
    "fp8-block": lambda g: g.compute_capability >= (9, 0),
    "fp4": lambda g: g.fp4,
    "w4a8-fp8": lambda g: g.compute_capability == (9, 0),
}


@dataclass(frozen=True)
class PrecisionScheme:
    """How one precision stores a Linear in vLLM's memory (not necessarily on disk).

    Per ``[out, in]`` weight: ``out*in*weight_bits/8`` bytes of codes, plus scales of
    ``scale_bytes`` per output channel (``group_size`` None), per group of ``group_size``
    inputs per output channel, or per ``block x block`` tile, plus packed 4-bit zero points
    when asymmetric. Embeddings, lm_head, norms and biases stay at 16 bits in every scheme.
    ``fallback`` says how vLLM serves the scheme on GPUs without its native kernel (from
    ``fallback_min`` on), or is None where it cannot.
    """

    name: str
    label: str
    weight_bits: int
    group_size: int | None = None
    symmetric: bool = True
    scale_bytes: int = 0
    activations: Kernel = "bf16"
    quantization_flag: str | None = None  # vLLM --quantization for online quantization of a BF16 checkpoint
    block: int | None = None
    fallback: str | None = None
    fallback_min: tuple[int, int] = (7, 5)

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        if self.weight_bits >= 16:
            return out_features * in_features * 2
        codes = out_features * in_features * self.weight_bits // 8
        if self.block is not None:
            return codes + math.ceil(out_features / self.block) * math.ceil(in_features / self.block) * self.scale_bytes
        groups = 1 if self.group_size is None else math.ceil(in_features / self.group_size)
        scales = out_features * groups * self.scale_bytes
        zeros = 0 if self.symmetric else math.ceil(out_features * groups * self.weight_bits / 8)
        return codes + scales + zeros

    def runs_on(self, gpu: GPU) -> bool:
        """Whether vLLM has a native kernel for this scheme on the GPU (tensor cores for its
        activations; see ``_NATIVE``)."""
        return _NATIVE[self.activations](gpu)

    def served_on(self, gpu: GPU) -> bool:
        """Whether vLLM serves it at all on the GPU, natively or through its fallback."""
        return self.runs_on(gpu) or (self.fallback is not None and gpu.compute_capability >= self.fallback_min)


SCHEMES: dict[str, PrecisionScheme] = {
    s.name: s
    for s in (
        PrecisionScheme("bf16", "BF16", 16),
        # compressed-tensors FP8_DYNAMIC: fp8 weights, one fp32 scale per output channel.
        PrecisionScheme("fp8", "FP8 W8A8", 8, scale_bytes=4, activations="fp8", quantization_flag="fp8",
                        fallback="Marlin W8A16"),
        # compressed-tensors W8A8 INT8: int8 weights, fp32 per-channel scale, dynamic per-token acts.
        PrecisionScheme("w8a8-int8", "INT8 W8A8", 8, scale_bytes=4, activations="int8"),
        # GPTQ / compressed-tensors pack-quantized: int4 packed in int32, 16-bit group scales.
        PrecisionScheme("w4a16", "W4A16 g128 sym (GPTQ)", 4, group_size=128, scale_bytes=2),
        # AWQ: as above plus packed 4-bit zero points per group.
        PrecisionScheme("w4a16-asym", "W4A16 g128 asym (AWQ)", 4, group_size=128, symmetric=False, scale_bytes=2),
        # compressed-tensors FP8_BLOCK: fp8 weights, one fp32 scale per 128x128 block.
        PrecisionScheme("fp8-block", "FP8 block 128 W8A8", 8, block=128, scale_bytes=4, activations="fp8-block",
                        fallback="Marlin W8A16"),
        # NVFP4: packed E2M1, one E4M3 scale per 16 (the fp32 global scales are negligible).
        PrecisionScheme("nvfp4", "NVFP4 W4A4 g16", 4, group_size=16, scale_bytes=1, activations="fp4",
                        fallback="Marlin W4A16, weights only"),
        # MXFP4A16: packed E2M1, one E8M0 (1-byte) scale per 32.
        PrecisionScheme("mxfp4", "MXFP4 W4A16 g32", 4, group_size=32, scale_bytes=1, activations="fp4",
                        fallback="Marlin W4A16", fallback_min=(8, 0)),
        # W4AFP8: int4 as W4A16 g128, FP8 activations; CUTLASS W4A8 on Hopper, nothing elsewhere.
        PrecisionScheme("w4afp8", "W4AFP8 g128 (int4, FP8 act.)", 4, group_size=128, scale_bytes=2,
                        activations="w4a8-fp8"),
    )
}

FIXED_GROUPS = ("nvfp4", "mxfp4", "w4afp8")
"""Schemes whose group size is part of the format (or vLLM's only kernel): --group-size leaves them."""


def get_scheme(name: str, group_size: int | None = None) -> PrecisionScheme:
    """A scheme by name; ``group_size`` overrides the W4A16 group (e.g. 64 or 32)."""
    key = name.lower().replace("_", "-")
    aliases = {"int8": "w8a8-int8", "w8a8": "w8a8-int8", "fp8-dynamic": "fp8", "gptq": "w4a16", "awq": "w4a16-asym"}
    key = aliases.get(key, key)
    if key not in SCHEMES:
        raise PlanError(f"scheme: unknown {name!r}", field="scheme", value=name, hint=f"known: {', '.join(SCHEMES)}")
    scheme = SCHEMES[key]
    if (group_size is not None and scheme.group_size is not None and group_size != scheme.group_size
            and key not in FIXED_GROUPS):
        if group_size <= 0:
            raise PlanError(f"--group-size: must be positive, got {group_size}", field="--group-size",
                            value=group_size)
        label = scheme.label.replace(f"g{scheme.group_size}", f"g{group_size}")
        scheme = PrecisionScheme(**{**asdict(scheme), "group_size": group_size, "label": label})
    return scheme



@dataclass(frozen=True)
class WeightBytes:
    """Bytes of weights on one GPU: quantized Linears (codes + scales + zeros) and the rest."""

    linears: int
    unquantized: int  # embeddings, lm_head (unless tied), norms, biases, at 16 bits

    @property
    def total(self) -> int:
        return self.linears + self.unquantized


def weight_bytes(shape: ModelShape, scheme: PrecisionScheme, tp: int = 1) -> WeightBytes:
    """Weight memory of one rank under tensor parallelism ``tp``.

    Column-parallel (q/k/v/gate/up) split outputs, row-parallel (o/down) split inputs, so
    groups of a W4A16 row-parallel Linear split too. KV heads fewer than ``tp`` replicate
    k/v_proj. Embedding and lm_head are vocab-parallel (padded to 64 rows); norms replicate.
    """
    linears = sum(scheme.linear_bytes(ls.out_features, ls.in_features) * ls.count for ls in linear_shapes(shape, tp))
    vocab = padded_vocab_per_gpu(shape, tp)
    embed = vocab * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    return WeightBytes(linears, 2 * (embed + norms + bias_params(shape, tp) + router_params(shape)))
