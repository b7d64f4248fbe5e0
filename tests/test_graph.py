"""The layer graph, per family, checked against the model's own float64 computation.

Every family's graph is derived by quantkit from the model's code; these tests take a fresh
float64 instance of the same layer (the family's transformers config class, different random
weights, the arguments its own model's forward gives the layer, captured here with a plain
forward pre-hook) and check what the graph claims:

- every producer it calls exact takes random positive per-channel scales (``fold_scales``)
  without changing the layer's output (1e-6 relative; GQA ties respected);
- every layer it calls rotatable computes ``layer(x) Q`` from ``x Q`` once rotated
  (``rotate_layer``) with a random orthogonal ``Q``;
- the facts the issue names (Gemma's offset norms, Phi-3's row slices, Cohere's one group
  read by attention and MLP, post-norms blocking rotation) are what was derived;
- and the checks fail on deliberately wrong claims, so they can catch a wrong rule.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from quantkit.graph import fold_scales, rotate_layer
from quantkit.graph.model import derive_model_graph
from quantkit.graph.resume import resumed
from quantkit.graph.rotate import random_orthogonal
from quantkit.graph.skeleton import build_meta, locate_decoder
from tests.tiny_models import MOE_FAMILIES, MULTIMODAL_FAMILIES, TEXT_FAMILIES, family_config, model_class_for

FAMILIES = TEXT_FAMILIES + MULTIMODAL_FAMILIES
RTOL = 1e-6


class Instance:
    """A float64 model of the family with fresh random weights, its derived graph, and the
    arguments each decoder layer receives from the model's own forward."""

    def __init__(self, family: str, seed: int = 7):
        config = family_config(family, vocab=256, layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2)
        cls = model_class_for(config)
        meta = build_meta(cls, config, torch.float32)
        self.location = locate_decoder(meta, family)
        self.graph = derive_model_graph(meta, self.location)
        torch.manual_seed(seed)
        self.model = cls._from_config(config, dtype=torch.float64).eval()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if p.dim() == 1:
                    p.copy_(0.5 + torch.rand_like(p))  # norms far from 1 (and from 0 for 1 + w norms)
                else:
                    p.normal_(0, p.shape[-1] ** -0.5)
        self.layers = self.model.get_submodule(self.location.layers)
        self.calls: dict[int, tuple] = {}
        handles = [layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: self.calls.setdefault(i, (args, kwargs)) and None, with_kwargs=True)
            for i, layer in enumerate(self.layers)]
        with torch.no_grad():
            self.model(input_ids=torch.randint(0, 200, (2, 24)), use_cache=False)
        for h in handles:
            h.remove()

    def run(self, i: int, layer=None, x: torch.Tensor | None = None) -> torch.Tensor:
        args, kwargs = self.calls[i]
        args = ((x if x is not None else args[0]),) + tuple(args[1:])
        with torch.no_grad():
            out = (layer or self.layers[i])(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def instances():
    cache: dict[str, Instance] = {}

    def get(family: str) -> Instance:
        if family not in cache:
            cache[family] = Instance(family)
        return cache[family]

    return get


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def fold_error(inst: Instance, i: int, group, tie: bool = True, gen=None) -> float:
    """Relative change of layer ``i``'s output after folding random positive scales into
    ``group`` (tied across a GQA group as the map says, unless ``tie`` is False)."""
    gen = gen or torch.Generator().manual_seed(i)
    n = inst.graph.layer(i).unit(group.key).in_features
    cmap = group.producer.channels
    if tie:
        t = 0.5 + 1.5 * torch.rand(cmap.producer_channels(n), dtype=torch.float64, generator=gen)
        s = t[cmap.index(n)]
    else:
        s = 0.5 + 1.5 * torch.rand(n, dtype=torch.float64, generator=gen)
    layer = copy.deepcopy(inst.layers[i])
    fold_scales(layer, group, s)
    return rel_err(inst.run(i, layer), inst.run(i))


def rotation_error(inst: Instance, i: int, graph) -> float:
    q = random_orthogonal(inst.model.get_submodule(inst.location.text_model).config.hidden_size,
                          torch.Generator().manual_seed(3))
    layer = copy.deepcopy(inst.layers[i])
    rotate_layer(layer, graph, q)
    x = inst.calls[i][0][0]
    return rel_err(inst.run(i, layer, x @ q), inst.run(i) @ q)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_folds_leave_the_layer_unchanged(instances, family):
    inst = instances(family)
    checked = 0
    for i in range(len(inst.layers)):
        for group in inst.graph.layer(i).groups:
            if group.producer.exact:
                assert fold_error(inst, i, group) < RTOL, (i, group)
                checked += 1
    assert checked >= 2  # every family folds at least into v rows and the GLU's up rows


@pytest.mark.parametrize("family", FAMILIES)
def test_rotatable_layers_rotate_exactly(instances, family):
    inst = instances(family)
    for i in range(len(inst.layers)):
        graph = inst.graph.layer(i)
        if graph.rotatable:
            assert rotation_error(inst, i, graph) < RTOL, i
        else:
            assert graph.rotation_blockers()


EXPECTED = {
    # family: (producer kinds of the groups in order, rotatable)
    "llama": (["norm", "attention_value", "norm", "glu_partner"], True),
    "mistral": (["norm", "attention_value", "norm", "glu_partner"], True),
    "qwen2": (["norm", "attention_value", "norm", "glu_partner"], True),
    "qwen3": (["norm", "attention_value", "norm", "glu_partner"], True),
    "gemma2": (["offset_norm", "attention_value", "offset_norm", "glu_partner"], False),
    "gemma3": (["offset_norm", "attention_value", "offset_norm", "glu_partner"], False),
    "phi3": (["norm", "attention_value", "norm", "glu_partner"], True),
    "olmo2": (["unfoldable", "attention_value", "unfoldable", "glu_partner"], False),
    "cohere": (["norm", "attention_value", "glu_partner"], False),
    "gemma3-vl": (["offset_norm", "attention_value", "offset_norm", "glu_partner"], False),
    "qwen2.5-vl": (["norm", "attention_value", "norm", "glu_partner"], True),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_derived_facts(instances, family):
    inst = instances(family)
    graph = inst.graph.layer(0)
    kinds, rotatable = EXPECTED[family]
    assert [g.producer.kind for g in graph.groups] == kinds
    assert graph.rotatable == rotatable
    o = next(g for g in graph.groups if g.producer.kind == "attention_value")
    assert o.producer.channels.group == 2 and o.producer.channels.head_dim == 16  # 4 query heads per 2 kv heads
    assert not o.foldable  # tied: a free per-channel scale would not be exact
    if family == "phi3":
        qkv, gate_up = graph.unit("self_attn.qkv_proj"), graph.unit("mlp.gate_up_proj")
        assert [(s.role, s.start, s.end) for s in qkv.segments] == [("q", 0, 64), ("k", 64, 96), ("v", 96, 128)]
        assert [(s.role, s.start, s.end) for s in gate_up.segments] == [("gate", 0, 96), ("up", 96, 192)]
        assert o.producer.rows == (96, 128) and o.producer.module == "self_attn.qkv_proj"
        assert graph.groups[3].producer.rows == (96, 192)
    if family == "cohere":
        assert graph.groups[0].linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "mlp.gate_proj", "mlp.up_proj")
        assert graph.groups[0].fused == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                         ("mlp.gate_proj", "mlp.up_proj"))
        assert "centres its input" in graph.readers[0].reason
    if family in ("gemma2", "gemma3", "gemma3-vl", "olmo2"):
        assert {w.kind for w in graph.writers} == {"post_norm"}
        assert all("post-norm" in w.reason for w in graph.writers)
    if family in ("qwen3", "gemma3", "olmo2"):
        assert {"self_attn.q_norm", "self_attn.k_norm"} <= {u.module for u in graph.unquantized}


def _from_residual(inst: Instance, i: int, resume, layer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s output, and its output run from the residual ``resume.reader`` read in
    that run, with ``resume``'s modules skipped."""
    layer = layer or inst.layers[i]
    seen = []
    handle = layer.get_submodule(resume.reader).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        whole = inst.run(i, layer)
    finally:
        handle.remove()
    with resumed(layer, resume):
        return whole, inst.run(i, layer, x=seen[0].clone())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_resumed_after_its_attention_gives_its_output(instances, family):
    """Every family with a second residual block (all but Cohere's parallel one) computes its
    output from the residual that block reads, the attention skipped: to the bit, in float64."""
    inst = instances(family)
    resume = inst.graph.layer(0).resume
    if family == "cohere":
        assert resume is None  # attention and MLP both read the layer's input
        return
    assert "self_attn" in resume.skipped and resume.reader not in resume.skipped
    assert resume.reader == {"gemma2": "pre_feedforward_layernorm", "gemma3": "pre_feedforward_layernorm",
                             "gemma3-vl": "pre_feedforward_layernorm", "olmo2": "mlp"}.get(
                                 family, "post_attention_layernorm")
    assert set(resume.before) == {u.name for u in inst.graph.layer(0).units if u.name.startswith("self_attn.")}
    for i in range(len(inst.layers)):
        whole, resumed_out = _from_residual(inst, i, inst.graph.layer(i).resume)
        assert torch.equal(whole, resumed_out), (family, i)


# --------------------------------------------------------------------------- the checks can fail


def test_a_wrong_resume_point_is_caught(instances):
    """Skipping the MLP instead of the attention: the layer's output from the residual is not
    its output."""
    inst = instances("llama")
    wrong = replace(inst.graph.layer(0).resume, skipped=("mlp",), returns=(None,))
    whole, resumed_out = _from_residual(inst, 0, wrong)
    assert rel_err(resumed_out, whole) > 1e-2


def test_a_wrong_norm_rule_is_caught(instances):
    """Claiming Gemma's x·(1+w) norm were x·w: the fold check sees the output change."""
    inst = instances("gemma3")
    group = inst.graph.layer(0).groups[0]
    assert group.producer.kind == "offset_norm" and fold_error(inst, 0, group) < RTOL
    wrong = replace(group, producer=replace(group.producer, kind="norm"))
    assert fold_error(inst, 0, wrong) > 1e-3


def test_an_ignored_gqa_tie_is_caught(instances):
    """Folding free per-channel scales into v rows under GQA changes the output; tied ones do not."""
    inst = instances("llama")
    o = next(g for g in inst.graph.layer(0).groups if g.producer.kind == "attention_value")
    assert fold_error(inst, 0, o, tie=True) < RTOL
    assert fold_error(inst, 0, o, tie=False) > 1e-3


def test_a_wrong_slice_is_caught(instances):
    """Phi-3: folding into the gate half of gate_up_proj instead of the up half."""
    inst = instances("phi3")
    down = inst.graph.layer(0).groups[3]
    p = down.producer
    wrong = replace(down, producer=replace(p, rows=(0, p.rows[0]), channels=replace(p.channels, start=0)))
    assert fold_error(inst, 0, down) < RTOL and fold_error(inst, 0, wrong) > 1e-3


@pytest.mark.parametrize("family", ["gemma3", "cohere"])
def test_a_wrong_rotation_claim_is_caught(instances, family):
    """Rotating Gemma 3 as if o_proj/down_proj wrote the stream directly (ignoring its
    post-norms), or Cohere as if its mean-centring LayerNorm were an RMS norm: the rotated
    layer no longer computes layer(x) Q."""
    from quantkit.graph import ResidualWriter

    inst = instances(family)
    graph = inst.graph.layer(0)
    writers = tuple(ResidualWriter(u.name, "linear_rows", rotatable=True)
                    for u in graph.units if set(u.roles) & {"o", "down"})
    forced = replace(graph, readers=tuple(replace(r, rotatable=True) for r in graph.readers), writers=writers)
    assert forced.rotatable and not graph.rotatable
    assert rotation_error(inst, 0, forced) > 1e-3


def test_validation_and_the_run_derive_once_between_them():
    """Validation reads config.json as a dict, the run from the downloaded folder: the configs
    differ only in where they were read from (and, on a CPU, in the skeleton's dtype: fp32
    compute, bf16 checkpoint), which must not derive the layers again."""
    config = family_config("llama", 64, hidden=48, intermediate=72)  # sizes no other test derives
    cls = model_class_for(config)
    first = build_meta(cls, config, torch.float32)
    graph = derive_model_graph(first, locate_decoder(first, "t"))
    again = copy.deepcopy(config)
    again._name_or_path = "/somewhere/else"
    second = build_meta(cls, again, torch.float32)
    assert derive_model_graph(second, locate_decoder(second, "t")).types[0] is graph.types[0]
    half = build_meta(cls, copy.deepcopy(config), torch.bfloat16)
    assert derive_model_graph(half, locate_decoder(half, "t")).types[0] is graph.types[0]
    wider = copy.deepcopy(config)
    wider.intermediate_size = 80
    third = build_meta(cls, wider, torch.float32)
    assert derive_model_graph(third, locate_decoder(third, "t")).types[0] is not graph.types[0]


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_a_shrunk_instance_derives_the_real_sized_graph(family):
    """A real model (hidden > 256) has each layer type's graph derived on an instance with
    shrunk hidden, intermediate and expert sizes (or shrunk heads), which the tests above never
    reach at hidden 64. Here, at hidden 320, a shrunk instance succeeds for every layer, and its
    graph, realized to the real sizes, is the one a real-sized instance gives (the relative
    errors quoted in a reason differ between instances: masked)."""
    import re

    from quantkit.graph import derive

    config = family_config(family, vocab=256, layers=2, hidden=320, intermediate=512, heads=4, kv_heads=2)
    meta = build_meta(model_class_for(config), config, torch.float32)
    location = locate_decoder(meta, family)
    decoder = meta.get_submodule(location.text_model) if location.text_model else meta
    attr = location.layers[len(location.text_model) + 1:] if location.text_model else location.layers
    measured = re.compile(r"\d\.\de[-+]\d+")
    for i, layer in enumerate(getattr(decoder, attr)):
        shrunk = derive._derive_tiny(decoder, attr, i, layer, ("shrink", "shrink_heads"))
        real = derive._derive_tiny(decoder, attr, i, layer, ("real",))
        assert shrunk.unsupported is None and real.unsupported is None, (i, shrunk.unsupported, real.unsupported)
        assert measured.sub("#", repr(shrunk)) == measured.sub("#", repr(real)), i


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES, "tied"])
def test_one_walk_of_the_module_tree_lists_what_torch_lists(family):
    """The checkpoint names are matched against the skeleton's state-dict keys, and layers are
    told apart by their modules and parameters, each collected in one walk of the module tree:
    the same keys (tied ones under both names), experts modules, and the module and parameter
    lists of ``named_modules``/``named_parameters`` in their order."""
    from quantkit.graph.experts import UnfusedExperts
    from quantkit.graph.instance import signature
    from quantkit.graph.names import _state_names

    config = family_config("llama" if family == "tied" else family, vocab=64, tied=family == "tied")
    meta = build_meta(model_class_for(config), config, torch.float32)
    names, experts = _state_names(meta)
    assert list(names) and set(names) == set(meta.state_dict())
    assert experts == {n: m for n, m in meta.named_modules() if isinstance(m, UnfusedExperts)}
    assert (family in MOE_FAMILIES) == bool(experts)
    for layer in meta.get_submodule(locate_decoder(meta, family).layers):
        assert signature(layer) == (type(layer).__name__,
                                    tuple((n, type(m).__name__) for n, m in layer.named_modules()),
                                    tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()))


# --------------------------------------------------------------------------- Mixture-of-Experts (issue 16)


def test_moe_experts_are_units_of_one_input_group():
    """Fused 3-D experts become one MLP of Linears per expert; derived on a few experts and
    expanded to all. Under all-expert calibration every expert reads one tensor: their gate/up
    (and the shared expert's) form one group, one Hessian; each down_proj is its own group fed
    by its expert's up rows. A fold into the norm that also feeds the router is found not exact
    (the verification catches what a naive "norm → experts" rule misses)."""
    import transformers as tf

    cfg = tf.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, num_experts=8, num_experts_per_tok=2)
    meta = build_meta(tf.Qwen2MoeForCausalLM, cfg, torch.float32)
    graph = derive_model_graph(meta, locate_decoder(meta, "moe"))
    graph.check_supported("model moe")
    layer = graph.layer(0)
    assert layer.experts == ("mlp.experts",)
    experts = [u for u in layer.units if ".experts." in u.name]
    assert [u.name for u in experts] == [f"mlp.experts.{e}.{p}" for e in range(8)
                                         for p in ("gate_proj", "up_proj", "down_proj")]
    assert {(u.in_features, u.out_features) for u in experts if u.name.endswith("up_proj")} == {(64, 32)}
    shared = next(g for g in layer.groups if "mlp.shared_expert.up_proj" in g.linears)
    assert {f"mlp.experts.{e}.gate_proj" for e in range(8)} <= set(shared.linears)
    assert ("mlp.experts.5.gate_proj", "mlp.experts.5.up_proj") in shared.fused
    assert shared.producer.module == "post_attention_layernorm" and not shared.producer.exact
    assert "other readers" in shared.producer.reason
    down = next(g for g in layer.groups if g.linears == ("mlp.experts.6.down_proj",))
    assert (down.producer.module, down.producer.kind, down.producer.exact) == ("mlp.experts.6.up_proj",
                                                                              "glu_partner", True)
    routed = layer.per_expert()
    assert next(g for g in routed.groups if "mlp.experts.5.up_proj" in g.linears).linears == (
        "mlp.experts.5.gate_proj", "mlp.experts.5.up_proj")
    assert any(u.module == "mlp.gate" and u.reason.startswith("router") for u in layer.unquantized)
    # The one fact tracing cannot see: vLLM serves the shared-expert gate in float (overrides.py).
    assert "mlp.shared_expert_gate" not in layer.linears + shared.linears
    assert any(u.module == "mlp.shared_expert_gate" and "vLLM" in u.reason for u in layer.unquantized)


def test_a_unit_is_a_matrix_slice_of_a_parameter():
    """How an expert is addressed (issue 16): param[expert][rows], a view, not a copy."""
    from torch import nn

    from quantkit.graph import Unit

    layer = nn.Module()
    layer.experts = nn.Module()
    layer.experts.gate_up_proj = nn.Parameter(torch.randn(4, 6, 5))
    up = Unit("experts.up[2]", "experts.gate_up_proj", 5, 3, expert=2, rows=(3, 6))
    m = up.matrix(layer)
    assert m.shape == (3, 5) and torch.equal(m, layer.experts.gate_up_proj[2, 3:6])
    with torch.no_grad():
        m.mul_(2)
    assert torch.equal(layer.experts.gate_up_proj[2, 3:6], m)
