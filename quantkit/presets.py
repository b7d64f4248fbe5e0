"""Scheme presets by the names llm-compressor users know (compressed-tensors' ``PRESET_SCHEMES``).

A recipe's ``quantization.scheme: NVFP4`` picks one; the method (rtn, gptq) picks how the
weights are rounded onto it. Each preset equals the compressed-tensors 0.20 preset of the same
name, except ``FP8_BLOCK_A16``, which compressed-tensors has no name for: FP8_BLOCK's weights
without activation quantization (vLLM serves it through its W8A16 FP8 path).
"""

from __future__ import annotations

from .scheme import ActivationScheme, Scheme, WeightScheme

FP8_BLOCK = 128
"""Edge of FP8_BLOCK's square weight blocks and of its activation groups: what DeepSeek-style
checkpoints use and the only block every vLLM FP8 block kernel takes (vLLM's CPU kernels
require 128 input columns, its W8A16 path keys the block as 128x128)."""


def _int(bits: int, group: int | None = 128, symmetric: bool = True) -> WeightScheme:
    if group is None:
        return WeightScheme(num_bits=bits, symmetric=symmetric, strategy="channel", group_size=None)
    return WeightScheme(num_bits=bits, symmetric=symmetric, strategy="group", group_size=group)


def _fp8_block(block: int) -> WeightScheme:
    return WeightScheme(num_bits=8, type="float", strategy="block", group_size=None, block_size=(block, block))


_NVFP4_WEIGHTS = WeightScheme(num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_format="e4m3")
_NVFP4_ACTS = ActivationScheme(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic=True,
                               scale_format="e4m3")
_MXFP4_WEIGHTS = WeightScheme(num_bits=4, type="float", strategy="group", group_size=32, scale_format="e8m0")
_INT8_TOKEN = ActivationScheme(8, "int", True, "token", dynamic=True)
_FP8_TOKEN = ActivationScheme(8, "float", True, "token", dynamic=True)

PRESETS: dict[str, Scheme] = {
    "W4A16": Scheme(_int(4)),
    "W4A16_ASYM": Scheme(_int(4, symmetric=False)),
    "W8A16": Scheme(_int(8)),
    "W8A8": Scheme(_int(8, group=None), _INT8_TOKEN),
    "W4A8": Scheme(_int(4), _INT8_TOKEN),
    "W4AFP8": Scheme(_int(4), _FP8_TOKEN),
    "FP8_DYNAMIC": Scheme(WeightScheme(num_bits=8, type="float", strategy="channel", group_size=None), _FP8_TOKEN),
    "FP8_BLOCK": Scheme(_fp8_block(FP8_BLOCK), ActivationScheme(8, "float", True, "group", True, FP8_BLOCK)),
    "FP8_BLOCK_A16": Scheme(_fp8_block(FP8_BLOCK)),
    "NVFP4A16": Scheme(_NVFP4_WEIGHTS),
    "NVFP4": Scheme(_NVFP4_WEIGHTS, _NVFP4_ACTS),
    "MXFP4A16": Scheme(_MXFP4_WEIGHTS),
}

GROUP_SIZE_PRESETS = ("W4A16", "W4A16_ASYM", "W8A16", "W4A8", "W4AFP8")
"""Presets whose int group size a recipe may change (e.g. 64 where 128 does not divide)."""
BLOCK_PRESETS = ("FP8_BLOCK", "FP8_BLOCK_A16")
"""Presets whose block edge a recipe may change."""


def preset_scheme(name: str, group_size: int | None = None, block_size: int | None = None) -> Scheme:
    """The preset ``name`` (as in ``PRESETS``), optionally with another group size (int
    presets; -1 means per channel) or block edge (FP8 block presets, activations grouped
    alike). A ValueError says which knob this preset has."""
    scheme = PRESETS[name]
    ws, act = scheme.weights, scheme.input_activations
    if group_size is not None:
        if name not in GROUP_SIZE_PRESETS:
            raise ValueError(f"preset {name} has a fixed layout; group_size applies to {', '.join(GROUP_SIZE_PRESETS)}")
        ws = _int(ws.num_bits, None if group_size == -1 else group_size, ws.symmetric)
    if block_size is not None:
        if name not in BLOCK_PRESETS:
            raise ValueError(f"block_size applies to {', '.join(BLOCK_PRESETS)}, not {name}")
        ws = _fp8_block(block_size)
        if act is not None:
            act = ActivationScheme(8, "float", True, "group", True, block_size)
    return Scheme(ws, act)
