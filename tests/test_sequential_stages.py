"""GPTQ's ``sequential`` option: the stages a layer is calibrated in, and the engine's passes."""

from __future__ import annotations

import pytest
import torch

from quantkit.graph.experts import expert_of
from quantkit.graph.model import derive_model_graph
from quantkit.graph.skeleton import build_meta, locate_decoder
from quantkit.graph.stages import sequential_stages
from tests.tiny_models import MOE_FAMILIES, TEXT_FAMILIES, family_config, model_class_for


def _layer_graph(family: str, experts: int | None = None):
    config = family_config(family, vocab=256, layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2)
    if experts is not None:
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            if hasattr(config, key):
                setattr(config, key, experts)
    return _graph_of(config, 1)


def _graph_of(config, layer: int):
    meta = build_meta(model_class_for(config), config, torch.float32)
    return derive_model_graph(meta, locate_decoder(meta, "t")).layer(layer)


@pytest.mark.parametrize("family", TEXT_FAMILIES + MOE_FAMILIES)
def test_stages_split_the_groups_and_never_hold_a_group_with_its_producer(family):
    """Every group is in exactly one stage, in the graph's order within each stage, with its
    units; a group whose input a Linear produces (o_proj after v_proj, down_proj after up_proj)
    is in a later stage than that Linear's group."""
    graph = _layer_graph(family)
    stages = sequential_stages(graph)
    flat = [g for s in stages for g in s.groups]
    assert sorted(g.key for g in flat) == sorted(g.key for g in graph.groups)
    for s in stages:
        assert [g.key for g in s.groups] == [g.key for g in graph.groups if g in s.groups]
        assert set(s.linears) == {n for g in s.groups for n in g.linears}
    stage_of = {n: i for i, s in enumerate(stages) for n in s.linears}
    producers = 0
    for g in graph.groups:
        producer = g.producer.module
        if producer in stage_of:
            producers += 1
            assert stage_of[producer] < stage_of[g.linears[0]], (g.key, producer)
    assert producers >= 1  # at least o_proj's v_proj (or MLA's kv_b_proj)
    for n in stage_of:  # an expert's down_proj reads act(gate) * up, whatever names its producer
        if expert_of(n) is not None and n.endswith("down_proj"):
            gate = n[: -len("down_proj")] + "gate_proj"
            assert stage_of[gate] < stage_of[n], n


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_a_dense_layer_takes_a_stage_per_group(family):
    graph = _layer_graph(family)
    assert [s.groups for s in sequential_stages(graph)] == [(g,) for g in graph.groups]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_moe_layer_takes_as_many_stages_with_more_experts(family):
    """The number of calibration passes does not grow with the experts: the experts of a block
    make two stages (their gate/up, then their down), with 4 experts as with 16."""
    few, many = _layer_graph(family, 4), _layer_graph(family, 16)
    assert len(many.groups) > len(few.groups)
    assert len(sequential_stages(many)) == len(sequential_stages(few))
    expert_stages = [s for s in sequential_stages(many) if any(expert_of(n) for n in s.linears)]
    assert len(expert_stages) == 2


@pytest.mark.parametrize("all_experts", [True, False])
def test_sequential_run_of_a_moe_model_takes_a_pass_per_stage(all_experts, text_file, tmp_path, monkeypatch):
    """A tiny Qwen3-MoE quantized with ``sequential`` and input feedback: each layer is calibrated
    once per stage, and the experts' down_proj sees their gate/up quantized on the quantized
    stream (its input differs from the float stream's in the first layer, where the layer's own
    input is still the float one), also under routed calibration, where an expert's owner feeds
    it each token's two inputs from the recorded calls: the quantized one through the expert's
    substituted gate/up."""
    from quantkit import engine
    from quantkit.graph.experts import UnfusedExperts
    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", arch="qwen3_moe", layers=2, hidden=64, intermediate=128)
    passes: dict[int, int] = {}
    gap: dict[str, float] = {}
    observe_paired = engine._LayerCalibration.observe_paired

    def counted(self, stats, **kw):
        passes[self.index] = passes.get(self.index, 0) + 1
        watched = {n for n in stats if self.index == 0 and n.endswith("down_proj")}

        def spy(name, stat):
            def add(xq, xf):
                gap[name] = max(gap.get(name, 0.0), (xq - xf).abs().max().item())
                stat.add(xq, xf)
            return type("Spy", (), {"add": staticmethod(add), "reduce": staticmethod(stat.reduce),
                                    "owner": getattr(stat, "owner", None)})()
        observe_paired(self, {n: spy(n, s) if n in watched else s for n, s in stats.items()}, **kw)

    # The experts' weights each replayed call runs with, the float stream's call of a token's pair first.
    replayed: list[float] = []
    run_expert = UnfusedExperts.run_expert

    def recorded(self, e, x):
        replayed.append(sum(p.detach().double().sum().item() for p in self.parameters()))
        return run_expert(self, e, x)

    monkeypatch.setattr(engine._LayerCalibration, "observe_paired", counted)
    monkeypatch.setattr(UnfusedExperts, "run_expert", recorded)
    run(make_recipe({
        "model": {"id": str(model)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 32, "input_feedback": True, "sequential": True},
        "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 16, "batch_size": 2,
                        "all_experts": all_experts, "min_expert_tokens": 1},
        "evaluate": {"enabled": False}, "export": {"output_dir": str(tmp_path / "out")}, "device": "cpu"}),
        quiet=True)
    from transformers import AutoConfig

    stages = len(sequential_stages(_graph_of(AutoConfig.from_pretrained(model), 0)))
    assert passes == {0: stages, 1: stages}
    assert gap and all(v > 1e-4 for v in gap.values()), gap
    if not all_experts:  # from the down_proj stage on, a pair's quantized call runs other weights
        assert any(flt != quant for flt, quant in zip(replayed[::2], replayed[1::2]))


def test_stages_stop_the_forward_at_their_last_input(text_file, tmp_path, monkeypatch):
    """A sequential run of a dense layer: every pass stops at its stage's last input, so
    down_proj never runs in calibration (no stage reads its output) and q_proj only in o_proj's
    and gate/up's passes (q/k/v's pass stops at their shared input, before q_proj; gate/up's
    keeps the residual the attention left, and down_proj's pass starts there)."""
    from quantkit import engine
    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64, intermediate=128)
    calls = {"self_attn.q_proj": 0, "mlp.down_proj": 0}
    run_calibration = engine.run_calibration

    def counted(layer, hooks, forward, stop_early=False):
        handles = [layer.get_submodule(n).register_forward_hook(
            lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls]
        try:
            run_calibration(layer, hooks, forward, stop_early)
        finally:
            for h in handles:
                h.remove()

    monkeypatch.setattr(engine, "run_calibration", counted)
    run(make_recipe({
        "model": {"id": str(model)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 32, "sequential": True},
        "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 16, "batch_size": 2},
        "evaluate": {"enabled": False}, "export": {"output_dir": str(tmp_path / "out")}, "device": "cpu"}),
        quiet=True)
    layers, batches = 2, 2
    assert calls == {"mlp.down_proj": 0, "self_attn.q_proj": layers * 2 * batches}


def _gptq_checkpoint(model, text_file, out, **quantization) -> dict[str, torch.Tensor]:
    """The tensors of a tiny model's 4-bit GPTQ checkpoint (two batches of two sequences)."""
    from safetensors.torch import load_file

    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    run(make_recipe({
        "model": {"id": str(model)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 32, **quantization},
        "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 16, "batch_size": 2},
        "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cpu"}),
        quiet=True)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("sequential", [False, True])
def test_the_last_paired_pass_carries_the_float_stream(sequential, text_file, tmp_path, monkeypatch):
    """With input feedback the last paired pass over a dense layer runs the float stream whole
    and that output is the stream's next input: one float forward per batch and layer fewer
    than running the float layer again after quantization, and the checkpoint is the same to
    the bit as with that extra forward."""
    from quantkit import engine
    from quantkit.graph.runtime import ModelRunner

    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64, intermediate=128)
    forwards = {}
    run_layer, observe_paired = ModelRunner.run_layer, engine._LayerCalibration.observe_paired

    def counted(self, layer, hidden, call):
        forwards[mode] = forwards.get(mode, 0) + 1
        return run_layer(self, layer, hidden, call)

    def never_last(self, stats, later=()):
        observe_paired(self, stats, later=later or list(stats))

    monkeypatch.setattr(ModelRunner, "run_layer", counted)
    weights = {}
    for mode in ("carried", "forward again"):
        if mode == "forward again":
            monkeypatch.setattr(engine._LayerCalibration, "observe_paired", never_last)
        weights[mode] = _gptq_checkpoint(model, text_file, tmp_path / mode, input_feedback=True,
                                         sequential=sequential)
    layers, batches = 2, 2
    assert forwards["forward again"] - forwards["carried"] == layers * batches
    assert weights["carried"].keys() == weights["forward again"].keys()
    for k, v in weights["carried"].items():
        assert torch.equal(v, weights["forward again"][k]), k


# Attention forwards per batch and layer of a sequential run, (quantized stream, float stream),
# from the layer's input and resumed. Dense: the quantized stream's attention runs in the passes
# of o_proj, gate/up and down_proj and in the propagation, the float stream's in the first
# three; resumed, in o_proj's and gate/up's, and the float stream's in o_proj's. A MoE layer's
# first pass (q/k/v) runs whole on both streams, to count the routing: one more each; and its
# float stream leaves the layer in one more forward (its passes' outputs are not the layer's),
# from the residual when resumed.
_ATTENTION_RUNS = {"llama": {"from the input": (4, 3), "resumed": (2, 1)},
                   "qwen3_moe": {"from the input": (5, 5), "resumed": (3, 2)}}


@pytest.mark.parametrize("family", sorted(_ATTENTION_RUNS))
@pytest.mark.parametrize("feedback", [False, True])
def test_streams_resume_after_the_attention_and_the_checkpoint_is_the_same(family, feedback, text_file, tmp_path,
                                                                           monkeypatch):
    """A sequential run keeps, per stream, the residual the attention left once no later stage
    reads the attention: the float stream from o_proj's pass, the quantized one from gate/up's
    (its attention quantized then). Later passes and the propagation start there, and the
    checkpoint is the same to the bit as when every forward starts at the layer's input."""
    from quantkit.graph import derive
    from quantkit.graph.runtime import ModelRunner

    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", arch=family, layers=2, hidden=64, intermediate=128)
    attention = {}
    run_layer = ModelRunner.run_layer

    def counted(self, layer, hidden, call):
        handle = layer.self_attn.q_proj.register_forward_hook(
            lambda *_a: attention.__setitem__(mode, attention.get(mode, 0) + 1))
        try:
            return run_layer(self, layer, hidden, call)
        finally:
            handle.remove()

    monkeypatch.setattr(ModelRunner, "run_layer", counted)
    weights = {}
    for mode in ("resumed", "from the input"):
        if mode == "from the input":
            monkeypatch.setattr(derive, "_CACHE", {})
            monkeypatch.setattr(derive._Deriver, "_resume", lambda self: None)
        weights[mode] = _gptq_checkpoint(model, text_file, tmp_path / mode, input_feedback=feedback,
                                         sequential=True)
    layers, batches = 2, 2
    for mode, (quant, flt) in _ATTENTION_RUNS[family].items():
        assert attention[mode] == (quant + (flt if feedback else 0)) * layers * batches, mode
    assert weights["resumed"].keys() == weights["from the input"].keys()
    for k, v in weights["resumed"].items():
        assert torch.equal(v, weights["from the input"][k]), k


def test_a_pass_after_a_stream_resumed_may_not_read_the_attention(text_file, tmp_path, monkeypatch):
    """A quantizer whose pass says no later pass reads the attention, and then feeds one there,
    is stopped with an error: the streams no longer hold the attention's input."""
    from quantkit.quantizers import gptq

    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64, intermediate=128)
    quantize_layer = gptq.GPTQQuantizer.quantize_layer

    def again(self, layer, graph, calib, schemes=None):
        out = quantize_layer(self, layer, graph, calib, schemes)
        calib.observe({"self_attn.q_proj": gptq.HessianAccumulator()})  # the attention's input once more
        return out

    monkeypatch.setattr(gptq.GPTQQuantizer, "quantize_layer", again)
    with pytest.raises(RuntimeError, match="after a stream resumed"):
        _gptq_checkpoint(model, text_file, tmp_path / "out", sequential=True)


def test_plan_counts_what_sequential_stages_hold(text_file, tmp_path, monkeypatch):
    """What a sequential run holds for its stages at most (the substituted weights and the float
    ones put aside, in the layer's dtype) is within what ``quantkit plan`` counts for that layer
    in 16 bits, and more than the last stage's share below it: the plan counts every Linear."""
    from quantkit import engine
    from quantkit.pipeline import run
    from quantkit.planner import ModelShape
    from quantkit.planner.quantize import Calibrating, quantize_memory
    from quantkit.quantizers import QUANTIZERS
    from quantkit.recipe import make_recipe
    from transformers import AutoConfig

    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64, intermediate=128)
    held = []
    in_place = engine._weights_in_place

    def measured(layer, graph, weights, floats):
        held.append(sum(w.numel() for w in weights.values()) + sum(w.numel() for w in floats.values()))
        return in_place(layer, graph, weights, floats)

    monkeypatch.setattr(engine, "_weights_in_place", measured)
    params = {"method": "gptq", "bits": 4, "group_size": 32, "sequential": True, "input_feedback": True}
    run(make_recipe({
        "model": {"id": str(model)}, "quantization": params,
        "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 16, "batch_size": 2},
        "evaluate": {"enabled": False}, "export": {"output_dir": str(tmp_path / "out")}, "device": "cpu"}),
        quiet=True)
    config = AutoConfig.from_pretrained(model).to_dict()
    quantizer = QUANTIZERS["gptq"](QUANTIZERS["gptq"].Params.model_validate(params), config)
    planned = quantize_memory(ModelShape.from_config(config), Calibrating.of(quantizer, 4, 16, "test"))
    down = 64 * 128
    assert max(held) * 2 <= planned.substitutes  # elements, counted at 2 bytes each
    assert max(held) * 2 == planned.substitutes - 2 * 2 * down
    assert Calibrating.of(quantizer, 4, 16, "test").sequential
