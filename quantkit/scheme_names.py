"""Short names of a ``Scheme``: the usual one (W4A16-g128, FP8-static) and the planner's key of
the closest precision (it sizes the serve line and the disk estimate)."""

from __future__ import annotations

from .scheme import Scheme


def plan_scheme_key(scheme: Scheme) -> str:
    """The planner's name for the closest precision (it sizes the serve line)."""
    w, a = scheme.weights, scheme.input_activations
    if w.type == "float":
        return "fp8"
    if a is not None or w.num_bits == 8:
        return "w8a8-int8"
    return "w4a16" if w.symmetric else "w4a16-asym"


def scheme_name(scheme: Scheme) -> str:
    """The usual short name: W4A16, W8A8, FP8, W8A8-FP8-static ..."""
    w, a = scheme.weights, scheme.input_activations
    if w.type == "float":
        return "FP8" + ("" if a is None or a.dynamic else "-static")
    name = f"W{w.num_bits}A{a.num_bits if a else 16}"
    if w.strategy == "group":
        name += f"-g{w.group_size}"
    if not w.symmetric:
        name += "-asym"
    return name + ("" if a is None or a.dynamic else "-static")
