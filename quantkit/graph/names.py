"""Checkpoint tensor names versus the model's parameter names.

A checkpoint may name its tensors differently from the module tree transformers builds
(Gemma 3 and other multimodal models keep ``language_model.model.layers...``; Mixtral-style
MoE checkpoints keep one tensor per expert that transformers fuses). transformers 5 converts
them on load with its conversion mapping; quantkit applies the same mapping (its own
functions, not a copy) to know which source tensor is which parameter, and writes the
checkpoint's own names on export, which are the names vLLM reads.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .experts import UnfusedExperts, expert_of, fused_shape
from .skeleton import module_tree


class CheckpointNames:
    """Source tensor name → parameter name, for every tensor of a checkpoint."""

    def __init__(self, model: nn.Module, source_names: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        expected, experts = _state_names(model)
        prefix = getattr(model, "base_model_prefix", None)
        self.to_model: dict[str, str] = {}
        self.converted: dict[str, str] = {}  # many-to-one conversions quantkit cannot undo
        # Source tensors holding every expert of a block (fused in the checkpoint itself):
        # source name -> (experts module, fused parameter name).
        self.fused: dict[str, tuple[str, str]] = {}
        self.unexpected: list[str] = []
        for src in source_names:
            name, pattern = rename_source_key(src, renamings, converters, prefix, expected)
            if name not in expected and src in expected:
                name, pattern = rename_source_key(src, [], [], prefix, expected)
            container, _, leaf = name.rpartition(".")
            if pattern is not None and container in experts:
                per_expert = _expert_name(src, pattern, converters, container, leaf)
                if per_expert in expected:
                    self.to_model[src] = per_expert
                else:
                    self.converted[src] = name
            elif name not in expected:
                if container in experts:
                    self.fused[src] = (container, leaf)
                else:
                    self.unexpected.append(src)
            elif pattern is not None:
                self.converted[src] = name
            else:
                self.to_model[src] = name
        self.to_source = {m: s for s, m in self.to_model.items()}
        self.layouts = {n: m.layout for n, m in experts.items()}
        self._fused_containers = {c for c, _ in self.fused.values()}

    def per_expert(self, src: str) -> list[str]:
        """The per-expert tensors quantkit writes for ``src``, a tensor holding every expert of a
        block (``...experts.gate_up_proj`` → ``...experts.{e}.gate_proj.weight`` and ``up_proj``)."""
        container, leaf = self.fused[src]
        base, bias = (leaf[: -len("_bias")], True) if leaf.endswith("_bias") else (leaf, False)
        projections = ("gate_proj", "up_proj") if base == "gate_up_proj" else (base,)
        return [f"{container}.{e}.{p}.{'bias' if bias else 'weight'}"
                for e in range(self.layouts[container].num_experts) for p in projections]

    def fused_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor holding every expert of a block, with the shape its config implies."""
        return {src: fused_shape(self.layouts[c], leaf) for src, (c, leaf) in self.fused.items()}

    def held_fused(self, name: str) -> bool:
        """Module or parameter ``name`` belongs to one expert read out of a tensor holding every
        expert of its block."""
        hit = expert_of(name)
        return hit is not None and hit[0] in self._fused_containers

    def under(self, prefix: str) -> dict[str, str]:
        """Source tensors whose parameter lies under ``prefix`` (``"model.layers.3."``):
        parameter name relative to the prefix → source name."""
        return {m[len(prefix):]: s for s, m in self.to_model.items() if m.startswith(prefix)}

    def converted_under(self, prefix: str) -> list[str]:
        return [s for s, m in self.converted.items() if m.startswith(prefix)]

    def source_of(self, model_name: str) -> str:
        """The checkpoint name to write for parameter ``model_name`` (itself when unmapped)."""
        return self.to_source.get(model_name, model_name)

    def source_module(self, module: str) -> str:
        """The checkpoint spelling of a module path (``"model.language_model.layers.0.self_attn"``
        → ``"language_model.model.layers.0.self_attn"``), read off any parameter under it."""
        renamed = None
        for model_name, src in self.to_source.items():
            if model_name.startswith(module + "."):
                rest = model_name[len(module):]
                if src.endswith(rest):
                    return src[: -len(rest)]
                if renamed is None:  # the leaf renamed too (Mixtral's w1 for gate_proj): as many segments
                    depth = rest.count(".")
                    renamed = ".".join(src.split(".")[:-depth]) if src.count(".") >= depth else None
        return renamed or module


def _state_names(model: nn.Module) -> tuple[dict[str, bool], dict[str, UnfusedExperts]]:
    """The keys of ``model.state_dict()`` (parameters and persistent buffers under every path,
    tied ones twice; the values are only ``True``, which is all transformers' renaming asks
    of them) and the experts modules by name, from one walk of the module tree. Building the
    state dict and walking ``named_modules`` cost 2 s each on Qwen3-30B-A3B's 25k modules,
    in validation and again in the run."""
    names: dict[str, bool] = {}
    experts: dict[str, UnfusedExperts] = {}
    for path, m in module_tree(model):
        dot = path + "." if path else ""
        if isinstance(m, UnfusedExperts) and all(m is not e for e in experts.values()):
            experts[path] = m  # a module under two paths: its first, as named_modules gives it
        for n, p in m._parameters.items():
            if p is not None:
                names[dot + n] = True
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                names[dot + n] = True
    return names, experts


def _expert_name(src: str, pattern: str, converters: list, container: str, leaf: str) -> str | None:
    """The per-expert parameter (``container.{e}.gate_proj.weight``) a source tensor of one
    expert becomes, for the conversions that stack experts (``MergeModulelist(dim=0)``) and
    concatenate gate and up rows (``Concatenate(dim=1)``) in the order of their source
    patterns; None for any other conversion."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    conv = next((c for c in converters if pattern in c.source_patterns), None)
    if conv is None:
        return None
    ops = [(type(op), getattr(op, "dim", None)) for op in conv.operations]
    k = conv.source_patterns.index(pattern)
    if leaf == "gate_up_proj" and ops == [(MergeModulelist, 0), (Concatenate, 1)] and len(conv.source_patterns) == 2:
        proj = ("gate_proj", "up_proj")[k]
    elif leaf in ("down_proj", "up_proj") and ops == [(MergeModulelist, 0)] and len(conv.source_patterns) == 1:
        proj = leaf
    else:
        return None
    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), src)
    if found is None:
        return None
    return f"{container}.{found.group(1)}.{proj}.{'bias' if pattern.endswith('bias') else 'weight'}"
