"""The model's own module tree on the meta device, and how to bring parts of it to life.

Everything quantkit runs is transformers' own code: the class named in config.json is built
on the meta device (no memory), its decoder layers are found through the model's own
``get_decoder()``, and a module is made real with ``to_empty`` plus the model's own
``_init_weights`` (which recomputes non-persistent buffers such as RoPE frequencies and
Gemma's embedding scale) before its checkpoint tensors are copied in.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import ModelError
from .experts import unfuse_experts


def module_tree(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every ``(path, module)`` under ``root`` in ``named_modules``' order, a module reached by
    two paths under each (as ``state_dict`` lists its tensors): one walk with no nested
    generators, which cost seconds on a MoE skeleton's tens of thousands of modules."""
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        path, m = stack.pop()
        yield path, m
        dot = path + "." if path else ""
        stack.extend((dot + n, c) for n, c in reversed(m._modules.items()) if c is not None)


def model_class(config, where: str) -> type:
    """The transformers class config.json names (``architectures``), never remote code."""
    import transformers
    from transformers import PreTrainedModel

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    if not names:
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM._model_mapping[type(config)]
        except KeyError:
            pass
    raise ModelError(
        f"{where}: architecture {', '.join(names) or '(none named in config.json)'} is not implemented by "
        "the installed transformers; quantkit runs only models transformers implements (no remote code)",
        field="model.id", value=", ".join(names) or None,
        hint="upgrade transformers if the architecture is newer than it")


def build_meta(cls: type, config, dtype: torch.dtype, attn_implementation: str | None = None,
               experts_implementation: str | None = None) -> nn.Module:
    """The whole model on the meta device: shapes and code, no memory. Fused Mixture-of-Experts
    experts become one MLP of Linears per expert (``experts.unfuse_experts``)."""
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with _collector_paused():
        with torch.device("meta"):
            model = cls._from_config(config, **kwargs).eval()  # inference: no dropout anywhere
        unfuse_experts(model)
    return model


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a skeleton is built: a 48-layer MoE is
    ~100k new modules and parameters at once, and the collector walked them over and over
    (about 40% of building Qwen3-30B-A3B's skeleton, which validation and the run each do)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class DecoderLocation:
    """Where the decoder layers live: ``layers`` (a ModuleList path) inside ``text_model``."""

    text_model: str
    layers: str
    num_layers: int


def locate_decoder(model: nn.Module, where: str) -> DecoderLocation:
    """The language decoder and its layer list, through the model's own ``get_decoder()``."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    names = {id(m): n for n, m in model.named_modules()}
    if decoder is None or id(decoder) not in names:
        raise ModelError(f"{where}: {type(model).__name__} exposes no language decoder (get_decoder)",
                         field="model.id", hint="quantkit quantizes decoder-only language models")
    config = getattr(decoder, "config", model.config)
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    lists = [(name, m) for name, m in decoder.named_children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:  # get_decoder() answered the whole model (Llama 4 text): its one child holding the layers
        inner = [m for m in decoder.children()
                 if sum(isinstance(c, nn.ModuleList) and len(c) == n for c in m.children()) == 1]
        if len(inner) == 1:
            decoder = inner[0]
            lists = [(name, m) for name, m in decoder.named_children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if n <= 0 or len(lists) != 1:
        raise ModelError(f"{where}: cannot find the {n} decoder layers of {type(decoder).__name__}",
                         field="model.id", hint="report the architecture; its layer list is not a ModuleList of "
                         "num_hidden_layers layers")
    prefix = names[id(decoder)]
    return DecoderLocation(prefix, f"{prefix}.{lists[0][0]}" if prefix else lists[0][0], n)


def owner_of(model: nn.Module, name: str) -> nn.Module:
    """The nearest PreTrainedModel at or above ``name``: its ``_init_weights`` knows the module."""
    from transformers import PreTrainedModel

    best = model
    parts = name.split(".") if name else []
    for i in range(1, len(parts) + 1):
        m = model.get_submodule(".".join(parts[:i]))
        if isinstance(m, PreTrainedModel):
            best = m
    return best


def materialize(model: nn.Module, name: str, device: torch.device | str, module: nn.Module | None = None) -> nn.Module:
    """Give module ``name`` (or ``module``, a copy of it) real storage on ``device``, with
    buffers computed by the model's own init; parameters hold garbage until loaded."""
    mod = module if module is not None else model.get_submodule(name)
    mod.to_empty(device=device)
    init = owner_of(model, name)._init_weights
    with torch.no_grad():
        for m in mod.modules():
            init(m)
    return mod


def free(module: nn.Module) -> None:
    """Drop a module's storage (back to the meta device)."""
    module.to(device="meta")


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
