"""A random float64 instance of one decoder layer, built from the model's own classes.

The layer class comes from a copy of the model's own config: hidden and intermediate sizes
(and a factored projection's low rank) shrunk (head counts and head size real, so head maps
are the real ones), or, for attention that takes its head size from hidden / heads, one kv
head and its share of query heads, or the real sizes. Its arguments come from the tiny text model's own forward (``capture``);
its weights make every channel distinct.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .capture import LayerCall, capture, materialize_on_use
from .experts import all_experts, expert_of, expert_modules
from .skeleton import build_meta, materialize, module_tree
from .trace import TRACE_ATTENTION, LayerRun, register_trace_attention, run_layer

BATCH, TOKENS = 2, 8
# Shrunk sizes: distinct from each other and from every real dimension left unshrunk, so
# each tensor's channels are told apart by their count as well.
_HIDDEN_CHOICES = (64, 80, 96, 112, 48)
_INTERMEDIATE_CHOICES = (160, 176, 144, 208, 224)
# Low ranks of factored projections, shrunk like the intermediate size: MLA's query and
# key/value ranks (DeepSeek-V3: 1536 and 512; its q_b_proj alone is 300 MB in float64 on the
# instance, and deriving its graph took 18 s on one CPU core, 3.5 s with both shrunk).
# kv_a_proj's output is the key/value rank plus the RoPE width: the structure check explains a
# dimension as a shrunk size plus an unshrunk remainder too.
_LOW_RANK_KEYS = ("q_lora_rank", "kv_lora_rank")
_LOW_RANK_CHOICES = (40, 56, 72)
# Experts on the instance: a few stand for all (each expert's graph is the same up to its index).
_EXPERT_CHOICES = (3, 5, 6, 7)
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
MODES = ("shrink", "shrink_heads", "real")


class DerivationError(Exception):
    """The layer's graph cannot be derived; the message says why."""


def signature(layer: nn.Module) -> tuple:
    """The layer's class, its modules' names and classes and its parameters' names and shapes
    (what ``named_modules`` and ``named_parameters`` list, in their order), from one walk of the
    tree: their nested generators cost 1.6 s over Qwen3-30B-A3B's 48 layers of 128 experts."""
    modules: list[tuple[str, str]] = []
    params: list[tuple[str, tuple[int, ...]]] = []
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    for path, m in module_tree(layer):
        if id(m) in seen_modules:  # its children are the seen ones too
            continue
        seen_modules.add(id(m))
        modules.append((path, type(m).__name__))
        dot = path + "." if path else ""
        for n, p in m._parameters.items():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                params.append((dot + n, tuple(p.shape)))
    return type(layer).__name__, tuple(modules), tuple(params)


def _same_structure(tiny: nn.Module, real: nn.Module, sizes: dict[int, int], experts: int | None) -> bool:
    """Same parameters, and every dimension either real or a shrunk size (``sizes`` maps a
    tiny size to the real one; a fused projection may hold several of one, as ``2 * I``, or one
    plus an unshrunk width, as MLA's ``kv_lora_rank + qk_rope_head_dim``).
    With ``experts`` the instance has that many experts, which stand for all of the real ones."""
    a = dict(tiny.named_parameters())
    b = {n: p for n, p in real.named_parameters()
         if experts is None or (e := expert_of(n)) is None or e[1] < experts}
    if a.keys() != b.keys():
        return False

    def explained(t: int, r: int) -> bool:
        return t == r or any((t % st == 0 and t // st * sr == r and t // st <= 4) or t - st == r - sr > 0
                             for st, sr in sizes.items())

    return all(p.dim() == b[n].dim() and all(explained(t, r) for t, r in zip(p.shape, b[n].shape))
               for n, p in a.items())


@torch.no_grad()
def _randomize(layer: nn.Module, gen: torch.Generator) -> None:
    """Weights that make every channel distinct: Linears ~ N(0, 1/in), 1-D weights in
    [0.5, 1.5] (positive, not 1, so both x·w and x·(1+w) norms are exercised), biases small."""
    for name, p in layer.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / p.shape[-1] ** 0.5)
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        else:
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))


class TinyLayer:
    """A float64 instance of layer ``index`` of ``decoder``'s class, and its arguments.

    ``mode`` "shrink": small hidden and intermediate sizes, head counts and head size real;
    "shrink_heads" (for attention that takes its head size from hidden / heads): one kv head
    and its share of query heads, head size real; "real": the real sizes. Head maps depend
    only on the head size and the query heads per kv head, which every mode keeps; row ranges
    are read off a meta-device run of the real layer (``_real_segments``)."""

    def __init__(self, decoder: nn.Module, layers_attr: str, index: int, mode: str):
        real = getattr(decoder, layers_attr)[index]
        cfg = copy.deepcopy(decoder.config)
        self.h_real = int(cfg.hidden_size)
        self.h = self.h_real
        sizes: dict[int, int] = {}
        if mode != "real":
            taken = {int(d) for p in real.parameters() for d in p.shape}
            heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
            kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(cfg, "head_dim", None) or self.h_real // heads)
            cfg.head_dim = head_dim
            if mode == "shrink":
                self.h = next(h for h in _HIDDEN_CHOICES if h not in taken)
            else:  # the attention derives its head size from hidden / heads: shrink the heads instead
                cfg.num_attention_heads, cfg.num_key_value_heads = heads // kv, 1
                self.h = heads // kv * head_dim
                sizes[head_dim] = kv * head_dim
            cfg.hidden_size = self.h
            sizes[self.h] = self.h_real
            for key, choices in (("intermediate_size", _INTERMEDIATE_CHOICES),
                                 *((k, _LOW_RANK_CHOICES) for k in _LOW_RANK_KEYS)):
                real_size = getattr(cfg, key, None)
                if isinstance(real_size, int) and real_size > max(choices):
                    tiny = next(c for c in choices if c not in taken and c not in sizes)
                    setattr(cfg, key, tiny)
                    sizes[tiny] = real_size
        shrunk = _shrink_experts(cfg, {int(d) for p in real.parameters() for d in p.shape})
        self.experts, self.real_experts = shrunk or (None, None)
        if shrunk is not None:
            sizes[shrunk[0]] = shrunk[1]
        register_trace_attention()
        # Eager experts (a loop over each expert's matrices): grouped-matmul kernels take no float64.
        model = build_meta(type(decoder), cfg, torch.float64, TRACE_ATTENTION, experts_implementation="eager")
        layers = getattr(model, layers_attr)
        prefix = f"{layers_attr}.{index}"
        self.layer = materialize(model, prefix, "cpu").eval()
        if not _same_structure(self.layer, real, sizes, self.experts):
            raise DerivationError("the layer's other dimensions change with its hidden or intermediate size")
        gen = torch.Generator().manual_seed(1234 + index)
        _randomize(self.layer, gen)
        x = torch.randn(BATCH, TOKENS, self.h, dtype=torch.float64, generator=gen)
        undo = materialize_on_use(model, layers, lambda name, m: materialize(model, name, "cpu", m))
        try:
            got = capture(lambda: model(inputs_embeds=x, use_cache=False), layers, upto=index)
        finally:
            undo()
        self.x: torch.Tensor = got.hidden
        self.call: LayerCall = got.calls[index]
        self.gen = gen
        # Every expert runs on every token: each one's Linears are traced, and they read one tensor.
        for _, m in expert_modules(self.layer):
            m.all_experts = True

    def run(self, layer: nn.Module | None = None, x: torch.Tensor | None = None, **kw) -> LayerRun:
        layer = self.layer if layer is None else layer
        with all_experts(layer):
            return run_layer(layer, self.x if x is None else x, self.call, **kw)


def _shrink_experts(cfg, taken: set[int]) -> tuple[int, int] | None:
    """Give ``cfg`` a few experts (fewer routed per token, one routing group): ``(tiny, real)``
    expert counts, or None when the layer has no experts to shrink."""
    key = next((k for k in _EXPERT_COUNT_KEYS if isinstance(getattr(cfg, k, None), int)), None)
    if key is None:
        return None
    real = int(getattr(cfg, key))
    tiny = next((n for n in _EXPERT_CHOICES if n not in taken and n < real), None)
    if tiny is None:
        return None
    setattr(cfg, key, tiny)
    k = getattr(cfg, "num_experts_per_tok", None)
    if isinstance(k, int):
        cfg.num_experts_per_tok = min(k, 2)
    for group_key in ("n_group", "topk_group"):
        if isinstance(getattr(cfg, group_key, None), int):
            setattr(cfg, group_key, 1)
    return tiny, real
