"""The memory planner against figures computed here by hand, never by the code under test.

Configs are copied from the real Llama-3.1 config.json files (values written out below).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import ModelError, QuantkitError
from quantkit.gpus import GPUError, get_gpu
from quantkit.planner import (
    ModelShape,
    PlanError,
    count_parameters,
    get_scheme,
    kv_bytes_per_token,
    load_config,
    plan_config,
    plan_model,
    serve_command,
    weight_bytes,
)
from quantkit.plan_cli import add_plan_command, main
from quantkit.quantizers.gptq import FEEDBACK_TARGET_MATRICES

GiB = 2**30

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}
LLAMA_70B = {
    **LLAMA_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
# Llama-3.2-1B: tied embeddings.
LLAMA_1B_TIED = {
    **LLAMA_8B,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "tie_word_embeddings": True,
    "head_dim": 64,
}

# Hand figures. Per layer, Llama linears (out, in) with head_dim 128 and 8 KV heads:
# q (H, H), k (1024, H), v (1024, H), o (H, H), gate (I, H), up (I, H), down (H, I).
PARAMS_8B = 8_030_261_248
PARAMS_70B = 70_553_706_496
PARAMS_1B_TIED = 1_235_814_400


def hand_linears(hidden, inter, kv_dim=1024):
    return [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),
            (inter, hidden), (inter, hidden), (hidden, inter)]


def hand_w4a16_bytes(hidden, inter, layers, vocab, group=128, asym=False):
    """int4 codes (0.5 B), a 2-byte scale per group per output row, 4-bit zeros if asym."""
    total = 0
    for out, inp in hand_linears(hidden, inter):
        groups = out * (inp // group)
        total += out * inp // 2 + groups * 2 + (groups // 2 if asym else 0)
    total *= layers
    total += 2 * vocab * hidden * 2  # embed_tokens + lm_head, bf16
    total += (2 * layers + 1) * hidden * 2  # RMSNorm weights, bf16
    return total


# --------------------------------------------------------------------------- parameter counts


def test_parameter_counts_match_published_sizes():
    assert count_parameters(ModelShape.from_config(LLAMA_8B)) == PARAMS_8B
    assert count_parameters(ModelShape.from_config(LLAMA_70B)) == PARAMS_70B
    assert count_parameters(ModelShape.from_config(LLAMA_1B_TIED)) == PARAMS_1B_TIED


def test_bf16_weight_bytes():
    w8 = weight_bytes(ModelShape.from_config(LLAMA_8B), get_scheme("bf16"))
    w70 = weight_bytes(ModelShape.from_config(LLAMA_70B), get_scheme("bf16"))
    assert w8.total == 16_060_522_496  # ~16.06 GB
    assert w70.total == 141_107_412_992  # ~141 GB
    assert w70.unquantized == 2 * 128256 * 8192 * 2 + 161 * 8192 * 2


def test_tied_lm_head_counted_once():
    w = weight_bytes(ModelShape.from_config(LLAMA_1B_TIED), get_scheme("w4a16"))
    assert w.unquantized == 128256 * 2048 * 2 + 33 * 2048 * 2


def test_w4a16_bytes_by_hand():
    shape8 = ModelShape.from_config(LLAMA_8B)
    assert weight_bytes(shape8, get_scheme("w4a16")).total == hand_w4a16_bytes(4096, 14336, 32, 128256)
    assert weight_bytes(shape8, get_scheme("w4a16")).total == 5_700_591_616
    assert weight_bytes(shape8, get_scheme("w4a16-asym")).total == hand_w4a16_bytes(
        4096, 14336, 32, 128256, asym=True
    )
    shape70 = ModelShape.from_config(LLAMA_70B)
    assert weight_bytes(shape70, get_scheme("w4a16")).total == hand_w4a16_bytes(8192, 28672, 80, 128256)
    assert weight_bytes(shape70, get_scheme("w4a16", group_size=64)).total == hand_w4a16_bytes(
        8192, 28672, 80, 128256, group=64
    )


def test_w8_bytes_by_hand():
    shape = ModelShape.from_config(LLAMA_70B)
    linears = sum(o * i + o * 4 for o, i in hand_linears(8192, 28672)) * 80  # int8/fp8 + fp32 row scale
    expected = linears + 2 * 128256 * 8192 * 2 + 161 * 8192 * 2
    assert weight_bytes(shape, get_scheme("fp8")).total == expected
    assert weight_bytes(shape, get_scheme("w8a8-int8")).total == expected


def test_vocab_padded_to_64_like_vllm():
    shape = ModelShape.from_config({**LLAMA_8B, "vocab_size": 32001})
    w = weight_bytes(shape, get_scheme("bf16"))
    assert w.unquantized == 2 * 32064 * 4096 * 2 + 65 * 4096 * 2


def test_qwen2_attention_biases_stay_16_bit():
    qwen = {**LLAMA_8B, "architectures": ["Qwen2ForCausalLM"]}
    diff = weight_bytes(ModelShape.from_config(qwen), get_scheme("w4a16")).unquantized - weight_bytes(
        ModelShape.from_config(LLAMA_8B), get_scheme("w4a16")
    ).unquantized
    assert diff == 32 * (4096 + 1024 + 1024) * 2


# --------------------------------------------------------------------------- KV cache


def test_kv_bytes_per_token():
    s70, s8 = ModelShape.from_config(LLAMA_70B), ModelShape.from_config(LLAMA_8B)
    assert kv_bytes_per_token(s70) == 80 * 8 * 128 * 2 * 2 == 327_680
    assert kv_bytes_per_token(s70, "fp8") == 163_840
    assert kv_bytes_per_token(s8) == 32 * 8 * 128 * 2 * 2 == 131_072


def test_tensor_parallel_splits_weights_and_kv_and_replicates_few_kv_heads():
    s70 = ModelShape.from_config(LLAMA_70B)
    assert kv_bytes_per_token(s70, tp=2) == 163_840
    assert kv_bytes_per_token(s70, tp=8) == 80 * 1 * 128 * 2 * 2
    # 16 ranks, 8 KV heads: each rank still stores one whole head.
    assert kv_bytes_per_token(s70, tp=16) == 80 * 1 * 128 * 2 * 2
    per_rank = weight_bytes(s70, get_scheme("bf16"), tp=2).total
    linears = sum(o * i for o, i in hand_linears(8192, 28672)) * 80 * 2
    assert per_rank == linears // 2 + 128256 * 8192 * 2 + 161 * 8192 * 2
    result = plan_config(LLAMA_70B, "H100", gpus=16)
    assert any("replica" in n for n in result.notes)


def test_tensor_parallel_size_must_divide_heads():
    with pytest.raises(PlanError) as e:
        plan_config(LLAMA_70B, "H100", gpus=3)
    assert (e.value.field, e.value.value, e.value.hint) == ("--gpus", 3, "use a divisor such as 1, 2, 4, 8")


# --------------------------------------------------------------------------- GPUs


def test_gpu_capacities_are_what_cuda_reports():
    assert get_gpu("H100-80GB").memory_bytes == 85_017_493_504  # 79.18 GiB, measured
    assert get_gpu("h100").memory_bytes == 85_017_493_504
    assert get_gpu("H200").memory_bytes == 150_109_880_320  # 139.80 GiB, measured
    assert get_gpu("A100-80GB").memory_bytes == pytest.approx(79.15 * GiB, abs=2**20)
    assert get_gpu("RTX3070-8GB").memory_bytes == pytest.approx(7.79 * GiB, abs=2**20)
    assert get_gpu("L40S").fp8 and get_gpu("H100").fp8 and not get_gpu("A100").fp8
    assert get_gpu("24GB").memory_bytes == int(24 * GiB * 0.975)


def test_unknown_gpu_names_the_option():
    with pytest.raises(GPUError) as e:
        get_gpu("V100")
    assert (e.value.field, e.value.value) == ("--gpu", "V100") and "24GB" in e.value.hint


# --------------------------------------------------------------------------- fits / longest context


def hand_activation(hidden, inter, vocab, tokens, seqs, tp=1):
    """The allowance documented in plan.activation_bytes, written out again."""
    forward = tokens * (2 * hidden + 3 * inter // tp) * 2
    sampler = seqs * vocab * 22
    return max(forward, sampler) + GiB // 4 + (GiB // 2 if tp > 1 else 0)


def test_70b_w4a16_fits_one_h100_with_hand_computed_context():
    row = plan_config(LLAMA_70B, "H100-80GB").row("w4a16")
    budget = int(85_017_493_504 * 0.9)
    kv_budget = budget - hand_w4a16_bytes(8192, 28672, 80, 128256) - hand_activation(8192, 28672, 128256, 8192, 1024)
    expected = kv_budget // (16 * 327_680) * 16
    assert row.fits
    assert row.max_model_len == expected
    assert 90_000 < expected < 131072


def test_70b_bf16_does_not_fit_one_80gb_gpu():
    for gpu in ("H100-80GB", "A100-80GB"):
        row = plan_config(LLAMA_70B, gpu).row("bf16")
        assert not row.fits and row.max_model_len == 0


def test_8b_w4a16_fits_rtx3070_with_small_context():
    result = plan_config(LLAMA_8B, "RTX3070-8GB")
    row = result.row("w4a16")
    budget = int(get_gpu("RTX3070-8GB").memory_bytes * 0.9)
    kv_budget = budget - 5_700_591_616 - hand_activation(4096, 14336, 128256, 2048, 256)
    assert row.fits
    assert row.max_model_len == kv_budget // (16 * 131_072) * 16
    assert 2048 <= row.max_model_len < 16384
    assert not result.row("bf16").fits and not result.row("w8a8-int8").fits
    assert result.recommended == "w4a16"
    assert "--enforce-eager" in result.serve_command  # 0.1 x 7.79 GiB holds the context, not graphs


def test_context_capped_at_model_max_and_batch_divides():
    assert plan_config(LLAMA_8B, "H200").row("bf16").max_model_len == 131072
    one = plan_config(LLAMA_70B, "H100").row("w4a16")
    four = plan_config(LLAMA_70B, "H100", batch=4).row("w4a16")
    assert four.max_model_len == one.kv_budget_bytes // (16 * 327_680) // 4 * 16


def test_fp8_kv_cache_doubles_the_tokens():
    auto = plan_config(LLAMA_70B, "H100").row("fp8")
    fp8 = plan_config(LLAMA_70B, "H100", kv_cache_dtype="fp8").row("fp8")
    assert fp8.kv_bytes_per_token * 2 == auto.kv_bytes_per_token
    assert fp8.max_model_len == auto.kv_budget_bytes // (16 * 163_840) * 16


def test_asked_context_decides_fits():
    assert plan_config(LLAMA_70B, "H100", context=2048).row("fp8").fits
    assert not plan_config(LLAMA_70B, "H100", context=32768).row("fp8").fits


# --------------------------------------------------------------------------- recommendation


def test_recommendations():
    assert plan_config(LLAMA_8B, "H100").recommended == "bf16"
    # FP8 block is Hopper's native FP8 scheme and measured closer to BF16 than per-channel FP8
    assert plan_config(LLAMA_70B, "H100", context=2048).recommended == "fp8-block"
    assert plan_config(LLAMA_70B, "L40S", gpus=2, context=2048).recommended == "fp8"  # Ada: FP8 block via Marlin
    # 4-bit on Blackwell is NVFP4 (FP4 tensor cores); Hopper serves NVFP4 weight-only, so W4A16 there
    assert plan_config(LLAMA_70B, "B200", context=110_000, batch=3).recommended == "nvfp4"
    assert plan_config(LLAMA_70B, "H200", context=70_000, batch=3).recommended == "w4a16"
    assert plan_config(LLAMA_70B, "A100-80GB", context=4096).recommended == "w8a8-int8"  # no FP8 on Ampere
    assert plan_config(LLAMA_70B, "H100").recommended == "w4a16"  # FP8 leaves < 8k tokens
    assert plan_config(LLAMA_70B, "H100", gpus=2).recommended == "bf16"
    small = plan_config(LLAMA_70B, "24GB")
    assert small.recommended is None and small.serve_command is None
    assert any("--gpus 2" in n for n in small.notes)


# --------------------------------------------------------------------------- vllm serve


def test_serve_command_for_quantized_checkpoint():
    cmd = serve_command("org/llama-70b-w4a16", LLAMA_70B, "w4a16", gpu="H100-80GB")
    row = plan_config(LLAMA_70B, "H100").row("w4a16")
    assert cmd == (
        f"vllm serve org/llama-70b-w4a16 --dtype bfloat16 --max-model-len {row.max_model_len} "
        "--gpu-memory-utilization 0.9"
    )
    cmd = serve_command("out dir", LLAMA_70B, "fp8", gpu="H100", gpus=2, kv_cache_dtype="fp8", context=32768)
    assert cmd == (
        "vllm serve 'out dir' --dtype bfloat16 --kv-cache-dtype fp8 --max-model-len 32768 "
        "--tensor-parallel-size 2 --gpu-memory-utilization 0.9"
    )
    assert "--quantization" not in cmd
    assert serve_command("m", LLAMA_8B, "w8a8-int8") == "vllm serve m --dtype bfloat16"


def test_serve_command_refuses_what_does_not_fit():
    with pytest.raises(PlanError) as e:
        serve_command("m", LLAMA_70B, "bf16", gpu="H100")
    assert (e.value.field, e.value.value, e.value.hint) == ("gpu", "H100-80GB", "use more GPUs or a smaller scheme")
    with pytest.raises(PlanError) as e:
        serve_command("m", LLAMA_70B, "int3")
    assert (e.value.field, e.value.value) == ("scheme", "int3")


def test_plan_of_bf16_checkpoint_uses_online_fp8_or_names_quantkit_output(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    fp8 = plan_model(str(tmp_path), gpu="L40S", gpus=2, context=2048)
    assert fp8.serve_command.startswith(f"vllm serve {tmp_path} --quantization fp8 ")
    block = plan_model(str(tmp_path), gpu="H100", context=2048)
    assert block.serve_command.startswith(f"vllm serve ./{tmp_path.name}-fp8-block --dtype bfloat16")
    w4 = plan_model(str(tmp_path), gpu="H100")
    assert w4.serve_command.startswith(f"vllm serve ./{tmp_path.name}-w4a16 --dtype bfloat16")


# --------------------------------------------------------------------------- loading and errors


def test_config_errors_name_file_and_field(tmp_path):
    with pytest.raises(ModelError) as e:
        load_config(str(tmp_path))
    assert (e.value.field, e.value.file) == ("model", str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError) as e:
        load_config(str(tmp_path))
    assert (e.value.field, e.value.file) == ("model", str(tmp_path / "config.json"))
    with pytest.raises(ModelError) as e:
        plan_config({**LLAMA_8B, "hidden_size": "4096"})
    assert (e.value.field, e.value.value, e.value.file) == ("hidden_size", "4096", "model/config.json")
    with pytest.raises(PlanError) as e:
        plan_config(LLAMA_8B, batch=0)
    assert (e.value.field, e.value.value) == ("--batch", 0)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_unreachable_hub_id_is_a_clear_error(offline_hub):
    with pytest.raises(ModelError) as e:
        load_config("nobody/no-such-model")
    assert (e.value.field, e.value.value) == ("model", "nobody/no-such-model")
    assert e.value.hint == "check the path, the id, or your network/HF_TOKEN"


def test_hub_id_read_from_cache_offline(offline_hub):
    snap = offline_hub / "models--meta-llama--Llama-3.1-8B" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA_8B))
    refs = offline_hub / "models--meta-llama--Llama-3.1-8B" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    assert plan_model("meta-llama/Llama-3.1-8B").parameters == PARAMS_8B


# --------------------------------------------------------------------------- CLI


def test_cli_table_and_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    parser = argparse.ArgumentParser(prog="quantkit")
    add_plan_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", str(tmp_path), "--gpu", "L40S", "--context", "32768"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for label in ("BF16", "FP8 W8A8", "INT8 W8A8", "W4A16 g128 sym (GPTQ)", "W4A16 g128 asym (AWQ)"):
        assert label in out
    assert "recommended: bf16" in out
    assert f"vllm serve {tmp_path} --dtype bfloat16 --max-model-len 32768" in out

    assert main(["plan", str(tmp_path), "--gpu", "RTX3070", "--json", "--kv-cache-dtype", "fp8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended"] == "w4a16"
    assert data["rows"][0]["kv_bytes_per_token"] == 65_536
    assert data["gpu_memory_bytes"] == get_gpu("RTX3070-8GB").memory_bytes


def test_cli_errors_are_quantkit_errors(tmp_path):
    with pytest.raises(QuantkitError):
        main(["plan", str(tmp_path)])
    with pytest.raises(PlanError) as e:
        main(["plan"])
    assert e.value.field == "model"


def test_quantize_line_counts_input_feedback_of_a_recipe(tmp_path, capsys):
    """With ``--recipe``, the quantization-time need is that recipe's: input_feedback (GPTAQ)
    adds a second float32 [in, in] per input group (q/k/v and gate/up read the hidden size,
    o_proj the heads, down_proj the intermediate size) and the float model's calibration stream
    (samples x tokens x hidden in 16 bits); the table says what both are."""
    import yaml

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    h, i, q, samples, tokens = 4096, 14336, 32 * 128, 16, 512
    mems, lines = {}, {}
    for feedback in (False, True):
        recipe = tmp_path / f"feedback-{feedback}.yaml"
        recipe.write_text(yaml.safe_dump({
            "model": {"id": str(tmp_path)}, "quantization": {"method": "gptq", "input_feedback": feedback},
            "calibration": {"num_samples": samples, "max_seq_length": tokens},
            "export": {"output_dir": str(tmp_path / "out")}}))
        mems[feedback] = plan_model(recipe=str(recipe)).quantize_memory
        assert main(["plan", "--recipe", str(recipe)]) == 0
        lines[feedback] = [line for line in capsys.readouterr().out.splitlines()
                           if line.startswith(("quantize (", "  "))]
    plain, fb = mems[False], mems[True]
    assert fb.hessians - plain.hessians == 4 * (2 * h * h + q * q + i * i)
    assert (plain.float_activations, fb.float_activations) == (0, 2 * samples * tokens * h) == (0, fb.activations)
    # The feedback target of down_proj (the widest input) outweighs GPTQ's own solve.
    assert fb.solve == 4 * FEEDBACK_TARGET_MATRICES * i * i > plain.solve
    assert (fb.layer, fb.codes, fb.activations) == (plain.layer, plain.codes, plain.activations)
    # Each batch's (8 x 512 tokens) float-stream inputs of q/k/v, o_proj, gate/up and down_proj,
    # 16 bits, are kept for pairing during the calibration pass, before any solve.
    assert (plain.paired_inputs, fb.paired_inputs) == (0, 2 * 8 * tokens * (2 * h + q + i))
    assert fb.total - plain.total == (fb.hessians - plain.hessians) + fb.float_activations + fb.solve - plain.solve
    assert lines[True][0].startswith(f"quantize (gptq, {tmp_path}/feedback-True.yaml, 16 x 512 calibration tokens)")
    assert lines[True][0].endswith(f"float stream {2 * samples * tokens * h / GiB:.2f} + the larger of solve "
                                   f"{fb.solve / GiB:.2f} and paired inputs {fb.paired_inputs / GiB:.2f}")
    assert lines[True][1:] == [
        "  statistics: float32 [in, in] per input group: the quantized inputs' Hessian and its cross term with the "
        "float inputs",
        f"  solve: the larger of GPTQ's working set and the {FEEDBACK_TARGET_MATRICES} float32 [in, in] an input "
        "feedback target takes before its solve (the widest input)",
        "  float stream: the float model's calibration hidden states, kept beside the quantized model's and as "
        "large; paired inputs: every input group's float-stream input for one batch (8 x 512 tokens), kept until "
        "the quantized pass pairs it"]
    assert "float stream" not in lines[False][0]
    assert lines[False][1:] == ["  statistics: float32 [in, in] per input group: Hessian"]


def test_quantize_line_of_a_recipe_that_calibrates_nothing(tmp_path, capsys):
    """Round-to-nearest keeps no statistic and no calibration stream: weights and codes only."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text(json.dumps({"model": {"id": str(tmp_path)}, "quantization": {"method": "rtn"},
                                  "export": {"output_dir": str(tmp_path / "out")}}))
    m = plan_model(recipe=str(recipe)).quantize_memory
    assert m.total == m.layer + m.codes == 3 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert main(["plan", "--recipe", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"quantize (rtn, {recipe}; no calibration): ~{m.total / GiB:.2f} GiB on one device" in out


def test_plan_without_a_recipe_counts_the_shipped_4bit_recipes_quantizer():
    """The default quantize line is the largest need of the shipped GPTQ recipes' quantizers: the
    built-in default's (input_feedback and sequential on), at 128 x 2048 calibration tokens;
    llama8b-gptq, which tunes instead, needs less."""
    from quantkit.planner.quantize import SHIPPED_4BIT, Calibrating, quantize_memory
    from quantkit.planner.shape import ModelShape
    from quantkit.recipe import load_recipe

    theirs = Calibrating.of_recipe(load_recipe("smollm2-gptq"), LLAMA_8B)
    assert (theirs.method, theirs.statistics, theirs.float_stream, theirs.target_matrices, theirs.sequential) == (
        SHIPPED_4BIT.method, SHIPPED_4BIT.statistics, SHIPPED_4BIT.float_stream, SHIPPED_4BIT.target_matrices,
        SHIPPED_4BIT.sequential)
    tuned = Calibrating.of_recipe(load_recipe("llama8b-gptq"), LLAMA_8B)
    assert (tuned.method, tuned.float_stream, tuned.sequential) == ("gptq", False, False)
    shape = ModelShape.from_config(LLAMA_8B)
    assert quantize_memory(shape, tuned).total < quantize_memory(shape, SHIPPED_4BIT).total
    assert plan_config(LLAMA_8B).quantize_memory.calibrating == SHIPPED_4BIT
    assert (SHIPPED_4BIT.samples, SHIPPED_4BIT.seq_len) == (128, 2048)


def test_result_renders_in_notebooks():
    result = plan_config(LLAMA_8B, "H100", model="llama-8b")
    assert result.to_table() == str(result)
    assert "llama-8b" in result._repr_markdown_()


# --------------------------------------------------------------------------- properties


shapes = st.builds(
    lambda heads, kv_div, hd, mult, layers, vocab: {
        **LLAMA_8B,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // kv_div),
        "hidden_size": heads * hd,
        "head_dim": hd,
        "intermediate_size": heads * hd * mult,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
    },
    st.sampled_from([8, 16, 32]),
    st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([64, 128]),
    st.integers(2, 4),
    st.integers(1, 40),
    st.integers(1000, 200_000),
)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([1, 2, 4, 8]))
def test_schemes_order_and_tensor_parallel_totals(config, tp):
    shape = ModelShape.from_config(config)
    b = [weight_bytes(shape, get_scheme(n), tp).total for n in ("bf16", "fp8", "w4a16-asym", "w4a16")]
    assert b == sorted(b, reverse=True)
    one = weight_bytes(shape, get_scheme("bf16")).linears
    assert weight_bytes(shape, get_scheme("bf16"), tp).linears * tp >= one
    assert count_parameters(shape) * 2 <= weight_bytes(shape, get_scheme("bf16")).total <= (
        count_parameters(shape) + 2 * 63 * shape.hidden_size
    ) * 2
    assert math.isclose(kv_bytes_per_token(shape, "fp8") * 2, kv_bytes_per_token(shape))


def test_forward_peak_dominates_with_a_small_vocab():
    config = {**LLAMA_70B, "vocab_size": 32000}  # Llama-2-70B shape: the MLP, not the sampler, peaks
    row = plan_config(config, "H200").row("w4a16")
    act = hand_activation(8192, 28672, 32000, 8192, 1024)
    assert act == 8192 * (2 * 8192 + 3 * 28672) * 2 + GiB // 4
    assert row.activation_bytes == act
    assert row.kv_budget_bytes == int(150_109_880_320 * 0.9) - hand_w4a16_bytes(8192, 28672, 80, 32000) - act


def test_new_schemes_bytes_and_where_vllm_runs_them():
    shape = ModelShape.from_config(LLAMA_70B)
    lin = hand_linears(8192, 28672)
    blocks = sum(o * i + -(-o // 128) * -(-i // 128) * 4 for o, i in lin) * 80  # fp8 + fp32 per 128x128
    assert weight_bytes(shape, get_scheme("fp8-block")).linears == blocks
    assert weight_bytes(shape, get_scheme("nvfp4")).linears == sum(o * i // 2 + o * i // 16 for o, i in lin) * 80
    assert weight_bytes(shape, get_scheme("mxfp4")).linears == sum(o * i // 2 + o * i // 32 for o, i in lin) * 80
    assert get_scheme("nvfp4", group_size=64).group_size == 16  # fixed by the format, --group-size leaves it
    h100, a100, l40s, b200 = (get_gpu(n) for n in ("H100", "A100", "L40S", "B200"))
    native = {n: [g.name for g in (a100, l40s, h100, b200) if get_scheme(n).runs_on(g)]
              for n in ("fp8-block", "nvfp4", "mxfp4", "w4afp8")}
    assert native == {"fp8-block": ["H100-80GB", "B200"], "nvfp4": ["B200"], "mxfp4": ["B200"], "w4afp8": ["H100-80GB"]}
    assert get_scheme("nvfp4").served_on(a100) and not get_scheme("w4afp8").served_on(a100)
    rows = plan_config(LLAMA_70B, "A100-80GB", context=2048)
    assert not rows.row("w4afp8").fits and rows.row("nvfp4").fits
    assert any("NVFP4 W4A4 g16 through Marlin W4A16, weights only" in n for n in rows.notes)

