"""Mixture-of-Experts end to end (issue 16).

1. Unfused experts compute what transformers' fused experts compute, for every layout its
   experts decorator describes (Mixtral's concatenated gate/up; gpt-oss's transposed,
   interleaved, biased experts with its own clamped gate), routed and all-expert alike.
2. Each MoE family's full pipeline run: per-expert checkpoint names as the checkpoint (and
   vLLM's ``expert_params_mapping``) spell them, routers float and in the ignore list,
   transformers reloads the output and its logits match quantkit's fake-quantized model,
   token counts per expert in report.json and the card.
3. An expert the router never picks: with all-expert calibration it gets a Hessian from every
   token; with routed calibration it is rounded to nearest, with a warning naming it.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from quantkit.engine import LayerwiseEngine, _LayerCalibration, make_batches
from quantkit.graph.experts import UnfusedExperts, is_fused_experts, layout_of, split_fused
from quantkit.graph.runtime import ModelRunner
from quantkit.model import ModelSource
from quantkit.moe import ExpertCalibration, ExpertReport
from quantkit.pipeline import run
from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.gptq import collect_hessians
from quantkit.quantizers.rtn import quantize_rtn
from quantkit.recipe import make_recipe
from tests.helpers import family_workspace, mask_router, run_family
from tests.test_export_e2e import read_tensors
from tests.tiny_models import model_class_for

transformers = pytest.importorskip("transformers")

FULL_RUN = {"mixtral": "gptq", "qwen2_moe": "gptq", "qwen3_moe": "awq", "deepseek_v3": "gptq", "llama4_text": "gptq"}
ROUTED_ONLY = {"qwen2_moe"}  # its run calibrates each expert on its routed tokens only
METHODS = {
    "rtn": {"method": "rtn", "bits": 4, "group_size": 64},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 64},
    # Symmetric: transformers 5's compressed-tensors MoE decompression reads no zero points
    # (integrations/compressed_tensors.py), so it cannot reload asymmetric experts; vLLM can.
    "awq": {"method": "awq", "bits": 4, "group_size": 64, "grid": 4, "max_calib_tokens": 64, "symmetric": True},
}
# The checkpoint's (and vLLM's) names of a MoE block's experts module and router (DeepSeek-V3's
# first layer is dense).
BLOCK = {"mixtral": ("model.layers.0.block_sparse_moe.experts", "model.layers.0.block_sparse_moe.gate"),
         "qwen2_moe": ("model.layers.0.mlp.experts", "model.layers.0.mlp.gate"),
         "qwen3_moe": ("model.layers.0.mlp.experts", "model.layers.0.mlp.gate"),
         "deepseek_v3": ("model.layers.1.mlp.experts", "model.layers.1.mlp.gate"),
         "llama4_text": ("model.layers.1.feed_forward.experts", "model.layers.1.feed_forward.router")}
TOP_K = {"llama4_text": 1}  # experts routed per token; 2 elsewhere
GATE = {"mixtral": "w1"}  # expert 1's gate projection leaf; gate_proj elsewhere


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return family_workspace(tmp_path_factory, "moe")


# --------------------------------------------------------------------------- 1. numerics


def _fused_and_unfused(cls, config, seed: int):
    torch.manual_seed(seed)
    fused = cls(config).to(torch.float64)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.3)
    state = {n: p.detach().clone() for n, p in fused.named_parameters()}
    with torch.device("meta"):
        skeleton = cls(config).to(torch.float64)
    unfused = UnfusedExperts(skeleton).to_empty(device="cpu")
    per_expert = {}
    for name, t in state.items():
        per_expert.update(split_fused(unfused.layout, name, t))
    unfused.load_state_dict(per_expert, strict=True)
    return fused, unfused


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_unfused_experts_compute_what_the_fused_ones_do(family):
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        config = transformers.MixtralConfig(hidden_size=24, intermediate_size=40, num_local_experts=5)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        config = transformers.GptOssConfig(hidden_size=24, intermediate_size=40, num_local_experts=5,
                                           swiglu_limit=1.5)  # low, so the clamp bites
    config._experts_implementation = "eager"
    fused, unfused = _fused_and_unfused(cls, config, seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 24, dtype=torch.float64, generator=gen)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(37)])  # expert 4 never picked
    w = torch.rand(37, 2, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        want = fused(x, idx, w)
        got_routed = unfused(x, idx, w)
        unfused.all_experts = True
        got_all = unfused(x, idx, w)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got_routed, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_all, want, rtol=1e-12, atol=1e-12)
    # Routed counts accumulate over both calls (each token counted once per expert it picks).
    assert unfused.routed.tolist() == (2 * torch.bincount(idx.flatten(), minlength=5)).tolist()


def test_routed_dispatch_is_the_per_expert_loop_bitwise():
    """The routed forward groups every expert's tokens with one sort and one host sync; each
    expert still gets its tokens in token order, so the output is bitwise what a loop of
    ``torch.where(idx == e)`` per expert gives; an index past the last expert (an
    expert-parallel sentinel) is dropped."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

    config = transformers.MixtralConfig(hidden_size=24, intermediate_size=40, num_local_experts=5)
    config._experts_implementation = "eager"
    _, unfused = _fused_and_unfused(cls, config, seed=2)
    unfused = unfused.float()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(53, 24, generator=gen)
    idx = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(53)])  # 5: the sentinel
    w = torch.rand(53, 3, generator=gen)
    want = torch.zeros_like(x)
    with torch.no_grad():
        for e in range(5):
            token, pos = torch.where(idx == e)
            want.index_add_(0, token, unfused._expert(e, x[token]) * w[token, pos, None])
        got = unfused(x, idx, w)
    assert torch.equal(got, want) and want.abs().max() > 0.1


def test_llama4_unfused_experts_compute_what_its_moe_block_does():
    """Llama 4 scales each expert's input by its router score: the unfused block computes
    what transformers' fused one does, routed and all-expert alike, and under all-expert
    calibration an expert the router never picks still runs on every token."""
    fused, unfused = _llama4_blocks()
    x = torch.randn(37, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 5.0
    seen: list[torch.Tensor] = []
    unfused.experts[4].up_proj.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    with torch.no_grad():
        want = fused(x)[0]
        got_routed = unfused(x)[0]
        unfused.experts.all_experts = True
        got_all = unfused(x)[0]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got_routed, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_all, want, rtol=1e-12, atol=1e-12)
    # Never routed, yet under all-expert calibration it reads every token (at its would-be score).
    assert len(seen) == 1 and seen[0].shape[0] == 37 and bool((seen[0].abs().sum(1) > 0).all())
    assert unfused.experts.routed[4] == 0 and int(unfused.experts.routed.sum()) == 2 * 37


def _llama4_blocks(top_k: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random Llama 4 MoE block (5 experts, hidden 24; the router never gives expert 4 the
    top score where input feature 0 is 5) and its copy with unfused experts, same weights."""
    import copy

    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    from quantkit.graph.experts import InputWeightedExperts, unfuse_experts

    config = transformers.Llama4TextConfig(hidden_size=24, intermediate_size=40, num_local_experts=5,
                                           num_experts_per_tok=top_k)
    torch.manual_seed(0)
    fused = Llama4TextMoe(config).to(dtype)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.3)
        fused.router.weight[4, 0] = -3.0
    unfused = copy.deepcopy(fused)
    state = {f"experts.{k}": v for name in ("gate_up_proj", "down_proj")
             for k, v in split_fused(layout_of(fused.experts), name, getattr(fused.experts, name)).items()}
    assert unfuse_experts(unfused) == 1 and isinstance(unfused.experts, InputWeightedExperts)
    unfused.experts.to_empty(device="cpu")
    unfused.load_state_dict({**{k: v for k, v in fused.state_dict().items() if not k.startswith("experts.")},
                             **state}, strict=True)
    return fused, unfused


@pytest.mark.parametrize("every", [False, True], ids=["routed", "all-experts"])
def test_llama4_recorded_call_gives_each_expert_what_its_forward_fed_it(every):
    """A Llama 4 experts call records the block's input once and the router logits, not the
    E scaled copies the block hands its experts; from them each expert's inputs (in bfloat16,
    where a rounding would show) are bit for bit what the call fed it, scaled by the router
    score, picked tokens or all, and another call's routing can pick the tokens instead."""
    _, block = _llama4_blocks(top_k=2, dtype=torch.bfloat16)
    experts = block.experts
    x = torch.randn(41, 24, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(5)}
    for e in range(5):
        experts[e].gate_proj.register_forward_pre_hook(lambda _m, args, e=e: seen[e].append(args[0]))
    experts.recorded, experts.all_experts = [], every
    with torch.no_grad():
        block(x)
        (hidden, logits), = experts.recorded
        assert hidden.shape == (41, 24) and logits.shape == (41, 5)
        replayed = dict(experts.expert_inputs([0, 1, 3, 4], hidden, logits))
        assert sorted(replayed) == sorted(e for e in (0, 1, 3, 4) if seen[e])
        for e, got in replayed.items():
            assert torch.equal(got, seen[e][0]), e
        if every:
            assert all(replayed[e].shape[0] == 41 for e in (0, 1, 3, 4))
            return
        # Another stream's choice picks the tokens; each is scaled by its own call's score.
        other = logits.roll(1, dims=1)
        for e, got in experts.expert_inputs([0, 1], hidden, logits, other):
            token = torch.topk(other, 2, dim=1).indices.eq(e).any(1)
            assert torch.equal(got, hidden[token] * torch.sigmoid(logits[token, e:e + 1].float()).to(hidden.dtype))


# --------------------------------------------------------------------------- 2. full runs


def _fuse_into(reference: torch.nn.Module, fake: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert fake-quantized weights (and biases) stacked into the reference model's fused
    parameters, in its layout (gate/up concatenated or interleaved, transposed or not)."""
    out = dict(fake)
    for name, mod in reference.named_modules():
        if not is_fused_experts(mod):
            continue
        layout = layout_of(mod)
        n = layout.num_experts
        for leaf in ("weight", "bias"):
            if f"{name}.0.down_proj.{leaf}" not in out:
                continue
            gate = [out.pop(f"{name}.{e}.gate_proj.{leaf}") for e in range(n)]
            up = [out.pop(f"{name}.{e}.up_proj.{leaf}") for e in range(n)]
            down = [out.pop(f"{name}.{e}.down_proj.{leaf}") for e in range(n)]
            if layout.is_concatenated:
                gate_up = [torch.cat([g, u]) for g, u in zip(gate, up)]
            else:
                gate_up = [torch.stack([g, u], dim=1).reshape(2 * g.shape[0], *g.shape[1:]) for g, u in zip(gate, up)]
            if leaf == "weight" and layout.is_transposed:
                gate_up, down = [t.T for t in gate_up], [t.T for t in down]
            suffix = "" if leaf == "weight" else "_bias"
            out[f"{name}.gate_up_proj{suffix}"] = torch.stack(gate_up)
            out[f"{name}.down_proj{suffix}"] = torch.stack(down)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family", sorted(FULL_RUN))
def test_moe_family_end_to_end(workspace, family):
    root, text, model = workspace
    base = model(family)
    out = root / f"out-{family}"
    report, states = run_family(base, text, out, METHODS[FULL_RUN[family]], all_experts=family not in ROUTED_ONLY)

    # Per-expert tensors under the checkpoint's own names; routers float and ignored.
    dst = read_tensors(out)
    block, router = BLOCK[family]
    name = f"{block}.1.{GATE.get(family, 'gate_proj')}"
    assert f"{name}.weight_packed" in dst and f"{name}.weight" not in dst
    assert dst[f"{router}.weight"].dtype == torch.float32
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    import re

    router_rule = next(i for i in ignore if i.startswith("re:") and re.match(i[3:], router))
    assert not re.match(router_rule[3:], name)

    # transformers reloads the checkpoint; its logits are the fake-quantized model's.
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = model_class_for(transformers.AutoConfig.from_pretrained(base)).from_pretrained(
        base, dtype=torch.float32).eval()
    prefix = ModelRunner(ModelSource.open(str(base)), torch.device("cpu"), torch.float32).layer_prefix
    fake = _fuse_into(reference, {f"{prefix(i)}{k}": v for i, s in states.items() for k, v in s.items()})
    assert not set(fake) - set(reference.state_dict())
    reference.load_state_dict(fake, strict=False)
    loaded = model_class_for(transformers.AutoConfig.from_pretrained(out)).from_pretrained(
        out, dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

    # Token counts per expert: all routed tokens counted (k per token); statistics from every
    # token, or from the routed ones.
    tokens = 4 * 48
    experts = report["experts"]
    counts = experts["routed_tokens"][block]
    assert len(counts) == 4 and sum(counts) == TOP_K.get(family, 2) * tokens and experts["rtn_fallback"] == []
    assert experts["statistics_tokens"][block] == (counts if family in ROUTED_ONLY else [tokens] * 4)
    card = (out / "README.md").read_text()
    assert "## Experts" in card and f"| {min(counts)} |" in card


# --------------------------------------------------------------------------- 3. an expert never picked


def _never_pick(gate: torch.nn.Module, expert: int) -> None:
    mask_router(gate, lambda _h: [expert])


@pytest.fixture(scope="module")
def starved_layer(workspace):
    _, _, model = workspace
    runner = ModelRunner(ModelSource.open(str(model("qwen3_moe"))), torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    return runner, runner.capture(make_batches(list(ids), 2))


def test_unpicked_expert_gets_every_token_with_all_expert_calibration(starved_layer):
    runner, batches = starved_layer
    layer = runner.load_layer(0)
    _never_pick(layer.mlp.gate, 3)
    graph = runner.graph.layer(0)
    calib = _LayerCalibration(runner, 0, layer, batches, 0, every_expert=True)
    accs, stats = collect_hessians(graph)
    calib.observe(stats)
    assert calib.routed["mlp.experts"][3] == 0 and sum(calib.routed["mlp.experts"]) == 2 * 128
    h3 = accs["mlp.experts.3.down_proj"]
    assert h3.tokens == 128 and bool((torch.diagonal(h3.hessian()) > 0).all())
    assert accs["mlp.experts.3.gate_proj"] is accs["mlp.experts.0.up_proj"]  # one Hessian for every gate/up
    assert accs["mlp.experts.3.gate_proj"].tokens == 128


def test_unpicked_expert_falls_back_to_rtn_with_routed_calibration(starved_layer, caplog):
    runner, batches = starved_layer
    layer = runner.load_layer(0)
    _never_pick(layer.mlp.gate, 3)
    quantizer = QUANTIZERS["gptq"](QUANTIZERS["gptq"].Params(**METHODS["gptq"]), {})
    engine = LayerwiseEngine(runner, quantizer, None, "", quiet=True, seed=0, experts=ExpertCalibration(False, 8))
    report = ExpertReport()
    with caplog.at_level(logging.WARNING, logger="quantkit.moe"):
        out, _ = engine._quantize(0, layer, batches, None, report)
    assert set(out) == set(runner.graph.layer(0).linears)
    assert report.routed["model.layers.0.mlp.experts"][3] == 0
    assert report.rtn_fallback == [f"model.layers.0.mlp.experts.3.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert any("model.layers.0.mlp.experts.3:" in r.getMessage() for r in caplog.records)
    for p in ("gate_proj", "up_proj", "down_proj"):
        want = quantize_rtn(layer.get_submodule(f"mlp.experts.3.{p}").weight.detach(), quantizer.scheme)
        assert torch.equal(out[f"mlp.experts.3.{p}"].codes, want.codes)
    # The routed experts got GPTQ from their own tokens, not RTN.
    rtn0 = quantize_rtn(layer.mlp.experts[0].down_proj.weight.detach(), quantizer.scheme)
    assert not torch.equal(out["mlp.experts.0.down_proj"].codes, rtn0.codes)


@pytest.fixture(scope="module")
def calibrated_layer(starved_layer):
    """Layer 0 of the tiny Qwen3-MoE with its Hessians (every expert on every token) and the
    default GPTQ scheme."""
    runner, batches = starved_layer
    layer = runner.load_layer(0)
    graph = runner.graph.layer(0)
    accs, stats = collect_hessians(graph)
    _LayerCalibration(runner, 0, layer, batches, 0).observe(stats)
    return layer, graph, accs, QUANTIZERS["gptq"].Params(**METHODS["gptq"]).scheme()


def test_stacked_gptq_in_row_chunks_is_the_same_solve(calibrated_layer, monkeypatch):
    """Every expert's gate/up share one Hessian and are solved stacked; in chunks (bounded
    memory) the codes are the same, since GPTQ treats rows independently given the Hessian."""
    from quantkit.quantizers import gptq

    layer, graph, accs, scheme = calibrated_layer
    whole = gptq.gptq_layer(layer, graph, accs, scheme)
    monkeypatch.setattr(gptq, "MAX_STACKED_ELEMENTS", 3 * 64 * 128)  # three expert matrices per solve
    chunked = gptq.gptq_layer(layer, graph, accs, scheme)
    assert len(gptq._row_chunks([f"mlp.experts.{e}.up_proj" for e in range(8)], [64 * 128] * 8,
                                gptq.MAX_STACKED_ELEMENTS)) == 3
    for name, qw in whole.items():
        assert torch.equal(qw.codes, chunked[name].codes) and torch.equal(qw.scale, chunked[name].scale), name


@pytest.mark.parametrize("preset", [None, "NVFP4A16"])
def test_experts_are_solved_in_batches_with_each_expert_s_own_result(calibrated_layer, monkeypatch, preset):
    """gptq_layer solves every expert's down_proj (own Hessians) in one batched call and the
    gate/up row chunks (one Hessian; with NVFP4 one chunk per expert, each fused pair with
    its own global scale) in another; each expert gets exactly what solving it alone gives,
    in the same per-expert layout."""
    from quantkit.presets import PRESETS
    from quantkit.quantizers import gptq

    layer, graph, accs, scheme = calibrated_layer
    experts = layer.mlp.experts.layout.num_experts
    schemes = {n: PRESETS[preset] if preset else scheme for n in graph.linears if ".experts." in n}
    kw = dict(act_order=True, static_groups=True)
    sizes: list[int] = []
    solve = gptq.gptq_quantize_batch
    monkeypatch.setattr(gptq, "gptq_quantize_batch", lambda w, *a, **k: sizes.append(w.shape[0]) or solve(w, *a, **k))
    monkeypatch.setattr(gptq, "MAX_STACKED_ELEMENTS", 2 * 128 * 128)  # gate/up of one expert per row chunk
    monkeypatch.setattr(gptq, "_batch_budget", lambda device, world: 1 << 30)
    batched = gptq.gptq_layer(layer, graph, accs, schemes, **kw)
    assert sorted(sizes) == [experts, experts]  # the gate/up chunks together, every down_proj together
    sizes.clear()
    monkeypatch.setattr(gptq, "_batch_budget", lambda device, world: 0)  # one solve per call
    alone = gptq.gptq_layer(layer, graph, accs, schemes, **kw)
    assert sizes == [1] * 2 * experts
    assert set(batched) == set(alone) == set(schemes) and len(schemes) == 3 * experts
    for name, qw in alone.items():
        got = batched[name]
        assert torch.equal(got.codes.view(torch.uint8), qw.codes.view(torch.uint8)), name
        assert torch.equal(got.scale, qw.scale) and got.scheme == qw.scheme, name
        assert got.codes.shape == graph.unit(name).matrix(layer).shape
        assert (got.global_scale is None) == (preset is None)
        if preset:
            assert torch.equal(got.global_scale, qw.global_scale), name


def test_experts_fused_in_the_checkpoint_are_refused_before_any_weight(workspace):
    """gpt-oss stores each block's experts in one tensor; vLLM 0.32 reads its quantized experts
    only under vLLM's own parameter names and skips per-expert checkpoint names silently, and
    transformers reads them only fused and float: the run stops first, naming the tensor and
    vLLM's loader. Its graph derives all the same (experts unfused, the family's clamped gate)."""
    from quantkit.errors import ModelError

    _, _, model = workspace
    runner = ModelRunner(ModelSource.open(str(model("gpt_oss"))), torch.device("cpu"), torch.float32)
    assert runner.graph.layer(0).experts == ("mlp.experts",)
    with pytest.raises(ModelError) as err:
        runner.check_supported()
    import re

    assert re.match(r".*: model\.layers\.\d+\.mlp\.experts\.(gate_up|down)_proj(_bias)? holds every expert",
                    str(err.value))
    assert "GptOssModel._load_weights_other" in str(err.value) and err.value.field == "model.id"


@pytest.mark.parametrize("change, field", [({"quantization": {"symmetric": False}}, "quantization.symmetric"),
                                           ({"export": {"format": "gptq"}}, "export.format")])
def test_llama4_qk_tensors_vllm_would_not_reorder_are_refused(workspace, tmp_path, change, field):
    """vLLM permutes Llama 4's q/k rows on load but not zero points nor the GPTQ format's
    tensors: such a recipe stops before any weight is read, naming the projection; with the
    attention's q/k/v left in float an asymmetric one goes ahead."""
    from quantkit.errors import RecipeError
    from quantkit.preflight import check

    _, text, model = workspace
    base = {"model": {"id": str(model("llama4_text"))},
            "quantization": {"method": "rtn", "bits": 4, "group_size": 64, **change.get("quantization", {})},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(tmp_path / "out"), **change.get("export", {})},
            "device": "cpu"}
    with pytest.raises(RecipeError) as err:
        check(make_recipe(base))
    assert err.value.field == field and str(err.value).startswith(
        f"{make_recipe(base).where}: model.layers.0.self_attn.q_proj: vLLM reorders")
    if field == "quantization.symmetric":
        base["quantization"]["ignore"] = ["lm_head", r"re:.*self_attn\.[qkv]_proj$"]
        assert check(make_recipe(base)).linears


# --------------------------------------------------------------------------- 4. plan


@pytest.mark.parametrize("family, config, published", [
    ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_hidden_layers=32), 46.7e9),
    ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                       num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                       num_hidden_layers=48), 30.5e9),
    ("qwen2_moe", dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, num_experts=60,
                       shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                       vocab_size=151936, num_hidden_layers=24), 14.3e9),  # Qwen1.5-MoE-A2.7B
    # Llama 4 Maverick's text model: MoE every second layer (dense ones wider), a shared expert
    ("llama4_text", dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                         num_local_experts=128, interleave_moe_layer_step=2, num_attention_heads=40,
                         num_key_value_heads=8, head_dim=128, vocab_size=202048, num_hidden_layers=48), 400e9),
])
def test_plan_counts_every_expert(family, config, published):
    """The serving size of a MoE model counts every expert (vLLM holds them all): parameter
    counts match the published model sizes; the quantization-time need of a MoE layer is far
    below one Hessian per expert Linear, and its experts' statistics split across GPUs."""
    from quantkit.planner.quantize import quantize_memory
    from quantkit.planner.shape import ModelShape, count_parameters

    cfg = transformers.CONFIG_MAPPING[family](**config, max_position_embeddings=4096).to_dict()
    shape = ModelShape.from_config(cfg)
    assert shape.moe_layers == config["num_hidden_layers"] // config.get("interleave_moe_layer_step", 1)
    assert count_parameters(shape) == pytest.approx(published, rel=0.01)
    mem = quantize_memory(shape)
    assert mem.hessians < mem.per_expert_hessians
    # On 4 GPUs each holds its own experts' statistics (they dominate) and a quarter of the
    # calibration batches; every device still holds the whole layer and its codes.
    four = quantize_memory(shape, gpus=4)
    assert four.hessians < mem.hessians and four.per_expert_hessians < mem.per_expert_hessians / 2
    assert (four.layer, four.codes) == (mem.layer, mem.codes)


_PLANNED = {
    "qwen2_moe": dict(hidden_size=64, moe_intermediate_size=32, num_experts=4, shared_expert_intermediate_size=48,
                      num_attention_heads=4, num_key_value_heads=2),
    "qwen3_moe": dict(hidden_size=64, moe_intermediate_size=32, num_experts=4, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=48),
    "llama": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=48),
}


@pytest.mark.parametrize("family", sorted(_PLANNED))
@pytest.mark.parametrize("feedback", [False, True])
def test_plan_counts_the_statistics_the_layer_graph_keeps(family, feedback):
    """The plan's statistics of a layer are those a run keeps for its layer graph: a float32
    ``[in, in]`` per input group (all-expert calibration) or per routed group (one per expert's
    gate/up and one per down_proj), GPTQ's Hessian, and with input_feedback two (the quantized
    inputs' Hessian and its cross term), plus the float model's stream beside the quantized one
    and, during a pass, one batch's float-stream input to every group."""
    from quantkit.graph.view import config_from_dict, model_view
    from quantkit.planner.quantize import Calibrating, quantize_memory
    from quantkit.planner.result import quantize_lines
    from quantkit.planner.shape import ModelShape

    cfg = transformers.CONFIG_MAPPING[family](**_PLANNED[family], intermediate_size=96, num_experts_per_tok=2,
                                              vocab_size=128, num_hidden_layers=1, max_position_embeddings=256)
    config = cfg.to_dict()
    graph = model_view(cfg, config, [], torch.float32, "config.json", family).graph.layer(0)
    quantizer = QUANTIZERS["gptq"](QUANTIZERS["gptq"].Params(input_feedback=feedback), config)
    mem = quantize_memory(ModelShape.from_config(config), Calibrating.of(quantizer, 8, 16, "test"))
    matrices = 2 if feedback else 1

    def statistics(g) -> int:
        return sum(4 * matrices * g.unit(group.key).in_features ** 2 for group in g.groups)

    assert mem.hessians == statistics(graph)
    assert mem.per_expert_hessians == statistics(graph.per_expert() if graph.experts else graph)
    assert mem.activations == 2 * 8 * 16 * 64
    assert mem.float_activations == (mem.activations if feedback else 0)
    # A paired pass keeps each group's float-stream input of one batch (8 x 16 tokens, 16 bits).
    assert mem.paired_inputs == (2 * 8 * 16 * sum(graph.unit(g.key).in_features for g in graph.groups)
                                 if feedback else 0)
    if graph.experts:
        told = quantize_lines(mem, 1, experts=True)[1]
        assert told.endswith(f"(under routed calibration, per expert's gate/up and down_proj: "
                             f"{mem.per_expert_hessians / 2**30:.2f} GiB)")


# --------------------------------------------------------------------------- 5. a source in FP8


def test_fp8_block_source_quantizes_as_its_dequantized_float(workspace, tmp_path):
    """DeepSeek-V3 ships FP8 weights with block scales: quantkit reads the float values they
    stand for, so the checkpoint equals the one made from a float copy holding exactly those
    values, and the source's scale tensors are not copied."""
    import shutil

    from safetensors.torch import load_file, save_file
    from quantkit.source_dequant import dequantize_fp8_blocks

    root, text, model = workspace
    base = model("deepseek_v3")
    fp8, flt = tmp_path / "fp8", tmp_path / "float"
    for d in (fp8, flt):
        shutil.copytree(base, d)
    shard = next(base.glob("*.safetensors")).name
    state = load_file(str(base / shard))
    q, f = {}, {}
    for name, t in state.items():
        if ".layers." in name and t.dim() == 2 and name.endswith("proj.weight"):
            rows, cols = (t.shape[0] + 63) // 64, (t.shape[1] + 63) // 64
            amax = t.abs().reshape(rows, 64, cols, 64).amax((1, 3)) if t.shape[0] % 64 == 0 and t.shape[1] % 64 == 0 \
                else torch.full((rows, cols), float(t.abs().max()))
            s = (amax / 448).clamp_min(1e-12)
            codes = (t / s.repeat_interleave(64, 0)[:t.shape[0]].repeat_interleave(64, 1)[:, :t.shape[1]]).to(
                torch.float8_e4m3fn)
            q[name], q[name + "_scale_inv"] = codes, s
            f[name] = dequantize_fp8_blocks(codes, s, (64, 64))
        else:
            q[name] = f[name] = t
    save_file(q, str(fp8 / shard), metadata={"format": "pt"})
    save_file(f, str(flt / shard), metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [64, 64]}
    (fp8 / "config.json").write_text(json.dumps(config))
    # The layer graph and transformers' conversion mapping see the float checkpoint's names:
    # transformers 5.17 matches "...up_proj.weight_scale_inv" as an expert weight to fuse,
    # which quantkit refuses (a real DeepSeek-V3 checkpoint failed so on an H200).
    from quantkit.preflight import check_run

    recipes = {label: make_recipe({"model": {"id": str(folder)}, "quantization": METHODS["gptq"],
                                   "calibration": {"source": str(text), "num_samples": 2, "max_seq_length": 32,
                                                   "batch_size": 2}, "evaluate": {"enabled": False},
                                   "export": {"output_dir": str(tmp_path / f"out-{label}")}, "device": "cpu"})
               for label, folder in (("fp8", fp8), ("float", flt))}
    assert check_run(recipes["fp8"])[1].source_names == check_run(recipes["float"])[1].source_names
    outs = {}
    for label, folder in (("fp8", fp8), ("float", flt)):
        outs[label] = tmp_path / f"out-{label}"
        run(recipes[label], quiet=True)
    a, b = read_tensors(outs["fp8"]), read_tensors(outs["float"])
    assert a.keys() == b.keys() and not any(k.endswith("_scale_inv") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_statistics_in_chunks_give_the_same_layer(starved_layer, monkeypatch):
    """When a layer's statistics do not fit the device (routed calibration keeps one Hessian
    per expert), experts are calibrated and quantized in chunks, one calibration pass each:
    the result is the same as in one pass."""
    from quantkit import engine as engine_module
    from quantkit.distributed import World
    from quantkit.graph.experts import expert_of
    from quantkit.moe import expert_owners, statistics_chunks

    runner, batches = starved_layer
    quantizer = QUANTIZERS["gptq"](QUANTIZERS["gptq"].Params(**METHODS["gptq"]), {})
    results = []
    for budget in (None, 4 * 128 * 128 * 3):  # room for the attention's and one expert's Hessians
        monkeypatch.setattr(engine_module, "statistics_budget", lambda _device, _world, b=budget: b)
        layer = runner.load_layer(0)
        engine = LayerwiseEngine(runner, quantizer, None, "", quiet=True, seed=0, experts=ExpertCalibration(False, 1))
        results.append(engine._quantize(0, layer, batches, None, ExpertReport())[0])
    parts = statistics_chunks(runner.graph.layer(0).per_expert(), 4 * 128 * 128 * 3)
    assert len(parts) == 4 and {u.name for p in parts for u in p.units} == set(runner.graph.layer(0).linears)
    # On two ranks each holds only its own experts' statistics: experts 1 (rank 1) and 2 (rank 0)
    # share the second pass, so one pass fewer.
    owners = expert_owners(runner.graph.layer(0), World(0, 2))
    two = statistics_chunks(runner.graph.layer(0).per_expert(), 4 * 128 * 128 * 3, owners)
    assert [sorted({expert_of(u.name)[1] for u in p.units if expert_of(u.name)}) for p in two] == [[0], [1, 2], [3]]
    # GPTAQ's two matrices per input (quantized inputs, cross term) take twice the room.
    paired = statistics_chunks(runner.graph.layer(0).per_expert(), 2 * 4 * 128 * 128 * 3, owners, matrices=2)
    assert [[u.name for u in p.units] for p in paired] == [[u.name for u in p.units] for p in two]
    assert len(statistics_chunks(runner.graph.layer(0).per_expert(), 4 * 128 * 128 * 3, owners, matrices=2)) > 3
    assert results[0].keys() == results[1].keys()
    for name, qw in results[0].items():
        assert torch.equal(qw.codes, results[1][name].codes), name


# --------------------------------------------------------------------------- 6. no broken scale is written


def test_an_expert_with_a_zero_scale_stops_the_run_naming_it(workspace, tmp_path):
    """An all-zero expert (pruned) quantized for a float16 checkpoint: its scales underflow to
    zero in float16, and the writer refuses the checkpoint naming the expert's tensor under the
    checkpoint's own name; nothing is published."""
    import shutil

    from safetensors.torch import load_file, save_file
    from quantkit.errors import NumericsError

    root, text, model = workspace
    src = tmp_path / "pruned"
    shutil.copytree(model("mixtral"), src)
    shard = next(src.glob("*.safetensors"))
    state = load_file(str(shard))
    state["model.layers.1.block_sparse_moe.experts.2.w2.weight"].zero_()
    save_file(state, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(NumericsError) as err:
        run(make_recipe({"model": {"id": str(src), "dtype": "float16"}, "quantization": METHODS["rtn"],
                         "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cpu"}),
            quiet=True)
    assert str(err.value).startswith("model.layers.1.block_sparse_moe.experts.2.w2.weight_scale: a scale is 0.0")
    assert not out.exists()


def test_routed_paired_statistics_pair_each_token_as_the_quantized_stream_routes_it(starved_layer):
    """GPTAQ under routed calibration: the float stream's router picks other tokens for an
    expert than the quantized stream's, so an expert's Hessian ``X̃ᵀX̃`` and cross term ``X̃ᵀX``
    pair each token the quantized stream routes to it with that token's float-stream input to
    the same expert (float64 reference, the expert run by hand on both streams' block inputs)."""
    from quantkit.graph.runtime import LayerInputs
    from quantkit.moe import expert_owners
    from quantkit.quantizers.gptq import collect_paired_hessians, hessians_to_owners, solve_parts

    runner, batches = starved_layer
    layer = runner.load_layer(0)
    graph = runner.graph.layer(0).per_expert()
    g = torch.Generator().manual_seed(1)
    floats = [LayerInputs(b.hidden + 0.5 * torch.randn(b.hidden.shape, generator=g), b.calls) for b in batches]
    block = layer.mlp.experts
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append((args[0].double(), args[1])))
    with torch.no_grad():
        for b in batches + floats:
            runner.run_layer(layer, b.hidden, b.calls[0])
    handle.remove()
    quant, flt = seen[:len(batches)], seen[len(batches):]
    assert any(not torch.equal(q[1], f[1]) for q, f in zip(quant, flt))  # the routers disagree

    accs, crosses, paired = collect_paired_hessians(graph)
    calib = _LayerCalibration(runner, 0, layer, batches, 0, every_expert=False, float_batches=floats,
                              owners=expert_owners(graph))
    scheme = QUANTIZERS["gptq"].Params(**METHODS["gptq"]).scheme()
    hessians_to_owners(solve_parts(layer, graph, accs, {n: scheme for n in graph.linears}, calib.world,
                                   calib.expert_owner), calib.world, accs, crosses)
    calib.observe_paired(paired)

    def inputs(e: int, proj: str, x: torch.Tensor) -> torch.Tensor:
        kept = []
        hook = block[e].get_submodule(proj).register_forward_pre_hook(lambda _m, a: kept.append(a[0].double()))
        with torch.no_grad():
            block.run_expert(e, x.float())
        hook.remove()
        return kept[0]

    for e in (0, 1, 2):
        tokens = [(q[1] == e).any(1) for q in quant]
        for proj in ("gate_proj", "down_proj"):
            xq = torch.cat([inputs(e, proj, q[0][t]) for q, t in zip(quant, tokens)])
            xf = torch.cat([inputs(e, proj, f[0][t]) for f, t in zip(flt, tokens)])
            name = f"mlp.experts.{e}.{proj}"
            assert accs[name].owner == 0 and accs[name].tokens == xq.shape[0] > 0
            torch.testing.assert_close(accs[name].hessian().double(), 2 * xq.T @ xq / len(xq), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(crosses[name].hessian().double(), 2 * xq.T @ xf / len(xq), rtol=1e-4,
                                       atol=1e-6)
