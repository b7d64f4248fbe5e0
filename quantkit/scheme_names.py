"""Short names of a ``Scheme``: the usual one (W4A16-g128, FP8-static, NVFP4) and the
planner's key of the closest precision (it sizes the serve line and the disk estimate)."""

from __future__ import annotations

from dataclasses import replace

from .presets import BLOCK_PRESETS, GROUP_SIZE_PRESETS, PRESETS, preset_scheme
from .scheme import Scheme

NEW_PRESETS = ("W4A8", "W4AFP8", "FP8_BLOCK", "FP8_BLOCK_A16", "NVFP4A16", "NVFP4", "MXFP4A16")
"""Presets named by their preset name; the others keep the W{w}A{a}-g{group} names."""


def plan_scheme_key(scheme: Scheme) -> str:
    """The planner's name for the closest precision (it sizes the serve line)."""
    w, a = scheme.weights, scheme.input_activations
    if w.type == "float" and w.num_bits == 4:
        return "nvfp4" if w.has_global_scale else "mxfp4"
    if w.type == "float":
        return "fp8-block" if w.strategy == "block" else "fp8"
    if w.num_bits == 4 and a is not None and a.type == "float":
        return "w4afp8"
    if w.num_bits == 8:
        return "w8a8-int8"
    return "w4a16" if w.symmetric else "w4a16-asym"


def scheme_name(scheme: Scheme) -> str:
    """The usual short name: W4A16-g128, W8A8, FP8, W8A8-FP8-static ..., or the preset's name
    for schemes only a preset names (NVFP4, FP8_BLOCK, ...; with the group or block when it is
    not the preset's)."""
    w, a = scheme.weights, scheme.input_activations
    plain = Scheme(replace(w, actorder=None), a)
    for name in NEW_PRESETS:
        if plain == PRESETS[name]:
            return name
        if name in GROUP_SIZE_PRESETS and w.strategy == "group" and plain == preset_scheme(name, w.group_size):
            return f"{name}-g{w.group_size}"
        if name in BLOCK_PRESETS and w.strategy == "block" and plain == preset_scheme(name, block_size=w.block_size[0]):
            return f"{name}-{w.block_size[0]}x{w.block_size[1]}"
    if w.type == "float":
        return "FP8" + ("" if a is None or a.dynamic else "-static")
    name = f"W{w.num_bits}A{a.num_bits if a else 16}"
    if w.strategy == "group":
        name += f"-g{w.group_size}"
    if not w.symmetric:
        name += "-asym"
    return name + ("" if a is None or a.dynamic else "-static")
