"""quantkit vs llm-compressor on one GPU, on random-weight models with real layer shapes.

    python benchmarks/gpu_vs_llmcompressor.py --work /tmp/qk-bench            # every case
    python benchmarks/gpu_vs_llmcompressor.py --cases gptq-8b-4,gptq-70b-2    # some cases
    python benchmarks/gpu_vs_llmcompressor.py --tools quantkit                # peers from the reference table

Each case builds (once, cached under ``--work``) a model with a few decoder layers of random
weights and otherwise the released model's config: Llama-3.1-8B and 70B, Qwen3-8B (q_norm/k_norm),
Gemma-3-12B's language model (offset norms, four norms per layer, sliding and global attention,
head_dim 256, 262k tied vocabulary). The config comes from the family's own transformers config
class and the tensor names from the model class built on the meta device, so both tools read
the same bf16 safetensors; norms hold the model's own initial values. Calibration: 128 x 2048
random token ids in a ``.safetensors`` file.
quantkit (``quantkit.quantize``, calibration ``source`` = that token file, evaluation off) and
llm-compressor (``oneshot`` on the model loaded on the CPU, which its sequential pipeline
onloads one layer at a time, with a ``datasets.Dataset`` of the same ids) each run in their
own subprocess, which reports wall time, peak GPU memory (``torch.cuda.max_memory_allocated``),
peak host RSS (``VmHWM``) and the checkpoint's size. Wall time is end to end for both: import
the tool (torch's import and CUDA's start are excluded for both; both import from a bytecode
cache filled by one untimed import of each tool, as an installation has), read the model from disk,
calibrate and quantize, write the checkpoint (llm-compressor's ``oneshot`` alone is reported
too). Without llm-compressor installed, or with ``--tools quantkit``, the
peer numbers are the reference measurements below, and the table says so.

Mixture-of-Experts cases (``--cases moe``, issue 16): Qwen3-30B-A3B (128 experts) x 2 layers,
Mixtral-8x7B x 2 and DeepSeek-V3 x 1 MoE layer (MLA attention, 256 experts, a shared expert:
22.5 GB of bf16 per layer, so one fits the disk beside the work files), GPTQ W4A16 with every
expert calibrated on every token by both tools (llm-compressor's ``moe_calibrate_all_experts``
default). Their extrapolations scale the per-layer time by expert parameters per layer
(Qwen3-235B-A22B from the 30B case) and by layer count (DeepSeek-V3-671B).

    python benchmarks/gpu_vs_llmcompressor.py --cases moe --samples 32 --drop-models

Also printed: quantkit's time per stage per layer (the engine's own stages: load, quantize,
propagate, export hand-off; with ``--stage-profile`` also calibration forward, Hessian
accumulation, GPTQ solve, AWQ search, export, each synchronised per call, which slows the run:
before stop 35 every run was timed so) and full-model extrapolations (32, 80, 36 and 48
layers) from the per-layer time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# --tiny (a CPU check of the script itself, not a measurement): tiny shapes, runs on the CPU.
DEVICE = os.environ.get("QK_BENCH_DEVICE", "cuda")

# Real configs with the decoder stack cut to ``layers``; everything else is the released model's.
_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
               max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
               rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               attention_bias=False, mlp_bias=False)
SHAPES = {
    "8b": dict(config=dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128), full_layers=32, name="Llama-3.1-8B"),
    "70b": dict(config=dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                            num_key_value_heads=8, head_dim=128), full_layers=80, name="Llama-3.1-70B"),
    # Qwen/Qwen3-8B: q_norm/k_norm per head, untied head, vocabulary 151936.
    "qwen3-8b": dict(config=dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096,
                                 intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                                 head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                                 rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False,
                                 attention_bias=False),
                     full_layers=36, name="Qwen3-8B"),
    # google/gemma-3-12b's language model (Gemma3ForCausalLM): offset norms, pre/post feed-forward
    # norms, head_dim 256, tied 262208-token head, 1024-token sliding window on five layers in six.
    # The four layers are three sliding and one global, so both attention kinds and both RoPE bases
    # are in the timing (the released model's first four are all sliding).
    "gemma3-12b": dict(config=dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=3840,
                                   intermediate_size=15360, num_attention_heads=16, num_key_value_heads=8,
                                   head_dim=256, query_pre_attn_scalar=256, vocab_size=262208,
                                   max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=1024,
                                   rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                   rope_scaling={"factor": 8.0, "rope_type": "linear"},
                                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                   final_logit_softcapping=None, attn_logit_softcapping=None,
                                   layer_types=["sliding_attention"] * 3 + ["full_attention"]),
                       full_layers=48, name="Gemma-3-12B (language model)"),
}
# Mixture-of-Experts shapes (issue 16): the real configs' sizes, random weights. ``config`` is
# given to the family's own transformers config class; checkpoints name each expert's tensors
# as the released models do (Mixtral w1/w2/w3 under block_sparse_moe).
MOE_SHAPES = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", full_layers=48, name="Qwen3-30B-A3B", config=dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False)),
    "mixtral-8x7b": dict(model_type="mixtral", full_layers=32, name="Mixtral-8x7B", config=dict(
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, rope_theta=1000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=32768, tie_word_embeddings=False)),
    # Every layer a MoE layer (first_k_dense_replace 0): the case measures MoE layers.
    "deepseek-v3": dict(model_type="deepseek_v3", full_layers=61, name="DeepSeek-V3-671B (58 MoE + 3 dense)",
                        config=dict(first_k_dense_replace=0, vocab_size=129280, max_position_embeddings=4096,
                                    tie_word_embeddings=False)),
    # The same, stored as DeepSeek ships it: every projection float8_e4m3fn with one scale per
    # 128x128 block (half the bytes: two layers fit the GPU machine's disk beside the output).
    "deepseek-v3-fp8": dict(model_type="deepseek_v3", full_layers=61, name="DeepSeek-V3-671B (FP8 source)",
                            fp8_block=128, config=dict(first_k_dense_replace=0, vocab_size=129280,
                                                       max_position_embeddings=4096, tie_word_embeddings=False)),
}
# Full models estimated from a measured case: the expert parameters per layer relative to the
# measured shape's (time and memory of a MoE layer scale with them), times the layer count.
MOE_EXTRAPOLATE = {
    "qwen3-30b-a3b": [("Qwen3-30B-A3B (48 layers)", 1.0, 48),
                      ("Qwen3-235B-A22B (94 layers; experts 4096 x 1536: 4x per layer)", 4.0, 94)],
    "mixtral-8x7b": [("Mixtral-8x7B (32 layers)", 1.0, 32)],
    "deepseek-v3": [("DeepSeek-V3-671B (61 layers, 58 MoE; dense ones counted as MoE)", 1.0, 61)],
    "deepseek-v3-fp8": [("DeepSeek-V3-671B (61 layers, 58 MoE; dense ones counted as MoE)", 1.0, 61)],
}
_TINY = {  # --tiny: the same families at sizes a CPU runs in seconds (inputs multiples of group 128)
    "qwen3_moe": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512),
    "mixtral": dict(hidden_size=128, intermediate_size=256, num_local_experts=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512),
    "deepseek_v3": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8,
                        num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=128, kv_lora_rank=128,
                        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=512),
}
# --cpu-wide: Qwen3-MoE with many small experts, so a CPU run has the per-expert costs of the
# real shape (128 experts of 768) without its size: a before/after measurement of MoE overheads.
_CPU_WIDE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_experts=32,
                 num_experts_per_tok=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=512)
# case: (shape, decoder layers, method)
MOE_CASES = {
    "moe-gptq-qwen3-30b-2": ("qwen3-30b-a3b", 2, "gptq"),
    "moe-gptq-qwen3-30b-4": ("qwen3-30b-a3b", 4, "gptq"),
    "moe-gptq-mixtral-2": ("mixtral-8x7b", 2, "gptq"),
    "moe-gptq-mixtral-4": ("mixtral-8x7b", 4, "gptq"),
    "moe-gptq-deepseek-v3-1": ("deepseek-v3", 1, "gptq"),
    "moe-gptq-deepseek-v3-fp8-2": ("deepseek-v3-fp8", 2, "gptq"),
}
CASES = {
    "gptq-8b-2": ("8b", 2, "gptq"),
    "gptq-8b-4": ("8b", 4, "gptq"),
    "gptq-70b-2": ("70b", 2, "gptq"),
    "awq-8b-4": ("8b", 4, "awq"),
    "w8a8-8b-4": ("8b", 4, "w8a8"),
    "fp8-8b-4": ("8b", 4, "fp8"),
    "gptq-qwen3-8b-4": ("qwen3-8b", 4, "gptq"),
    "awq-qwen3-8b-4": ("qwen3-8b", 4, "awq"),
    "gptq-gemma3-12b-4": ("gemma3-12b", 4, "gptq"),
    "awq-gemma3-12b-4": ("gemma3-12b", 4, "awq"),
}
# llm-compressor 0.14.0.1 on one H100, same shapes, 128 x 2048 calibration tokens, model on the
# CPU onloaded per layer (measured before this benchmark existed; its wall time is oneshot's).
REFERENCE = {
    "gptq-8b-4": dict(wall_s=32.6, gpu_gib=3.8, rss_gib=15.4),
    "gptq-70b-2": dict(wall_s=52.7, gpu_gib=14.9, rss_gib=14.0),
    "awq-8b-4": dict(wall_s=70.3, gpu_gib=50.7, rss_gib=20.8),
    "w8a8-8b-4": dict(wall_s=40.9, gpu_gib=3.8, rss_gib=25.6),
    "fp8-8b-4": dict(wall_s=0.7, gpu_gib=2.5, rss_gib=5.6),
}
# Calibration ids are drawn below the smallest vocabulary above, so one file serves every shape.
CALIBRATION_VOCAB = 128256
GIB = 1024**3
CASES.update(MOE_CASES)
# GPTQ with input_feedback (GPTAQ), quantkit only (--tools quantkit), not run by default: its
# peak GPU memory against what `quantkit plan --recipe` counts for the same recipe.
GPTAQ_CASES = {"gptaq-8b-2": ("8b", 2, "gptaq"), "gptaq-70b-2": ("70b", 2, "gptaq"),
               "moe-gptaq-qwen3-30b-2": ("qwen3-30b-a3b", 2, "gptaq")}
CASES.update(GPTAQ_CASES)
# The shipped 4-bit recipe's quantization (llama8b-gptq.yaml: asymmetric, clip search, input
# feedback, sequential, Hadamard), quantkit only, not run by default: its time against plain
# GPTQ's (the ``gptq`` cases of the same shape) at the sizes users quantize (issue 20's 2x).
SHIPPED_CASES = {"shipped-gptq-8b-4": ("8b", 4, "shipped-gptq"), "shipped-gptq-70b-2": ("70b", 2, "shipped-gptq")}
CASES.update(SHIPPED_CASES)


# ---------------------------------------------------------------- model and calibration set

def model_config(shape: str, layers: int):
    """The shape's transformers config (its own config class) with ``layers`` decoder layers."""
    from transformers import AutoConfig

    spec = dict(SHAPES[shape]["config"])
    model_type = spec.pop("model_type")
    if "layer_types" in spec:
        spec["layer_types"] = spec["layer_types"][:layers]
    config = AutoConfig.for_model(model_type, **spec, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)
    config.dtype = "bfloat16"
    return config


def _shard_of(name: str) -> str:
    parts = name.split(".")
    if "layers" in parts:
        return f"model-layer-{int(parts[parts.index('layers') + 1]):03d}.safetensors"
    return "model-head.safetensors" if name.startswith("lm_head.") else "model-embed.safetensors"


def _init_values(model, names: list[str]) -> dict:
    """The model's own initial value for each 1-D parameter (norm weights: 1, or 0 for Gemma's
    offset norms), taken by running its ``_init_weights`` on a CPU copy of the owning module."""
    import copy

    import torch

    values = {}
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = copy.deepcopy(model.get_submodule(owner_name)).to_empty(device="cpu")
        with torch.no_grad():
            getattr(owner, attr).fill_(float("nan"))
            model._init_weights(owner)
        value = getattr(owner, attr).detach()
        values[name] = torch.zeros_like(value) if value.isnan().any() else value.to(torch.bfloat16)
    return values


def build_model(shape: str, layers: int, folder: Path, seed: int = 0) -> Path:
    """A model folder of the shape's architecture with ``layers`` random decoder layers (bf16,
    std 0.02 for matrices, the model's own initial values for norms), one shard per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model_config(shape, layers)
    config.save_pretrained(tmp)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    params = dict(skeleton.named_parameters())  # tied weights appear once
    vectors = _init_values(skeleton, [n for n, p in params.items() if p.dim() == 1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    shards: dict[str, list[str]] = {}
    for name in params:
        shards.setdefault(_shard_of(name), []).append(name)
    weight_map = {}
    for shard, names in shards.items():
        tensors = {}
        for name in names:
            if name in vectors:
                tensors[name] = vectors[name]
            else:
                shape_ = tuple(params[name].shape)
                tensors[name] = (torch.randn(*shape_, generator=g, device=dev, dtype=torch.float32) * 0.02
                                 ).to(torch.bfloat16).cpu()
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
        del tensors
    return _publish(tmp, folder, weight_map)


def build_moe_model(shape: str, layers: int, folder: Path, seed: int = 0) -> Path:
    """A random-weight model of a MoE family (bf16, std 0.02, norms 1, router biases 0), its
    tensors named as the released checkpoints name them; one shard per decoder layer."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from quantkit.graph.skeleton import build_meta

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s = MOE_SHAPES[shape]
    cls = transformers.CONFIG_MAPPING[s["model_type"]]
    config = cls(**s["config"], num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[cls].__name__]
    config.torch_dtype = "bfloat16"
    block = s.get("fp8_block")
    if block:
        config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [block, block]}
    config.save_pretrained(tmp)
    meta = build_meta(transformers.AutoModelForCausalLM._model_mapping[cls], config, torch.bfloat16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)

    def tensor(name: str, shape_: tuple) -> torch.Tensor:
        if len(shape_) == 1:
            fill = 0.0 if "bias" in name else 1.0
            return torch.full(shape_, fill, dtype=torch.bfloat16)
        return (torch.randn(*shape_, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()

    def checkpoint_name(name: str) -> str:
        if s["model_type"] != "mixtral":
            return name
        name = name.replace(".mlp.", ".block_sparse_moe.")
        for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            name = name.replace(f".{ours}.weight", f".{theirs}.weight")
        return name

    def fp8_blocks(name: str, shape_: tuple) -> dict[str, torch.Tensor]:
        """A projection as DeepSeek ships it: codes and the inverse scale of each block."""
        w = torch.randn(*shape_, generator=g, device=dev) * 0.02
        rows, cols = -(-shape_[0] // block), -(-shape_[1] // block)
        padded = torch.zeros(rows * block, cols * block, device=dev)
        padded[: shape_[0], : shape_[1]] = w
        amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3)).clamp_min(1e-12)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        codes = (padded.view(rows, block, cols, block) / scale[:, None, :, None]).view(rows * block, cols * block)
        return {name: codes[: shape_[0], : shape_[1]].to(torch.float8_e4m3fn).cpu(),
                f"{name}_scale_inv": scale.cpu()}

    def tensors_of(name: str, shape_: tuple) -> dict[str, torch.Tensor]:
        if block and ".layers." in name and name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            return fp8_blocks(name, shape_)
        return {name: tensor(name, shape_)}

    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in meta.state_dict().items():
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
        shard = f"model-layer-{int(layer):03d}.safetensors" if layer is not None else "model-outside.safetensors"
        shards.setdefault(shard, {})[checkpoint_name(name)] = None  # type: ignore[assignment]
    weight_map = {}
    shapes = {checkpoint_name(n): tuple(p.shape) for n, p in meta.state_dict().items()}
    for shard, names in shards.items():
        tensors = {k: t for n in names for k, t in tensors_of(n, shapes[n]).items()}
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
        del tensors
    return _publish(tmp, folder, weight_map)


def _publish(tmp: Path, folder: Path, weight_map: dict[str, str]) -> Path:
    """Index and tokenizer into the folder being built, then move it into place."""
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(tmp)
    os.replace(tmp, folder)
    return folder


def write_tokenizer(folder: Path) -> None:
    """A stand-in tokenizer (the token ids come from a file; both tools only load it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(str(folder))


def build_calibration(path: Path, n: int, length: int, seed: int = 0, vocab: int = CALIBRATION_VOCAB) -> Path:
    import torch
    from safetensors.torch import save_file

    if not path.is_file():
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (n, length), generator=g)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids}, str(path))
    return path


# ---------------------------------------------------------------- workers (own process each)

def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _cuda_init() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.init()
        if os.environ.get("QK_BENCH_NO_CUDNN_SDPA"):  # --no-cudnn-sdpa, for both tools
            torch.backends.cuda.enable_cudnn_sdp(False)


def _gpu_peaks() -> dict:
    import torch

    if DEVICE != "cuda":
        return {"gpu_gib": 0.0, "gpu_reserved_gib": 0.0}
    return {"gpu_gib": torch.cuda.max_memory_allocated() / GIB, "gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _shipped_quantization(name: str) -> dict:
    """The ``quantization`` block of the recipe the package ships as ``name``, as written there."""
    import yaml

    from quantkit import shipped

    return yaml.safe_load(shipped.recipe(name).read_text())["quantization"]


def _quantkit_recipe(method: str, model: Path, calib: Path, out: Path, n: int, length: int, batch: int) -> dict:
    q = _shipped_quantization("llama8b-gptq") if method == "shipped-gptq" else {
        "gptq": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "static_groups": True},
        "gptaq": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "static_groups": True,
                  "input_feedback": True},
        "awq": {"method": "awq", "bits": 4, "group_size": 128, "symmetric": False},
        "w8a8": {"method": "dynamic_int8", "weight_method": "gptq", "smoothquant_alpha": 0.8, "act_order": True},
        "fp8": {"method": "fp8", "weight_strategy": "channel", "activations": "dynamic"},
    }[method]
    return {"model": {"id": str(model), "dtype": "bfloat16"}, "quantization": q,
            "calibration": {"source": str(calib), "num_samples": n, "max_seq_length": length, "batch_size": batch},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(out), "overwrite": True}, "device": DEVICE}


class _Profile:
    """Wraps quantkit's numerics functions with synchronised timers (a few syncs per call)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        # Each call's seconds of the engine's own stages (the first layer's against the others');
        # the export thread's stages are called hundreds of times and keep their sums only.
        self.calls: dict[str, list[float]] = {}

    def wrap(self, owner, attr: str, stage: str, sync: bool = True) -> None:
        """``sync=False`` for what runs in the export's thread: a device-wide sync there would
        wait for the engine's queued work, and the job ends with its own stream's sync."""
        import torch

        fn = getattr(owner, attr)

        wait = torch.cuda.synchronize if DEVICE == "cuda" and sync else (lambda: None)

        def timed(*a, **k):
            wait()
            t = time.perf_counter()
            try:
                with torch.profiler.record_function(stage):  # a row of --torch-profile's tables
                    return fn(*a, **k)
            finally:
                wait()
                took = time.perf_counter() - t
                self.seconds[stage] = self.seconds.get(stage, 0.0) + took
                if sync:  # the engine's own stages
                    self.calls.setdefault(stage, []).append(took)

        setattr(owner, attr, timed)


def _wrap_stages(prof: _Profile) -> None:
    """Time quantkit's stages (``--stage-profile``). Each engine-thread stage synchronises the
    device before and after every call: the Hessian accumulation's hundreds of calls a layer
    then stall the host at every batch (1-2% of an 8B layer's time, more for the recipes with
    more calls: input feedback adds the cross term's), so the timed runs leave them out."""
    from quantkit import checkpoint, engine, export, pipeline, preflight
    from quantkit.graph import runtime, view
    from quantkit.quantizers import awq, gptq, hessian, int8_dynamic

    prof.wrap(hessian.HessianAccumulator, "add", "hessian accumulation")
    # every solve goes through the batched one (gptq_quantize is its batch of one): counted once
    prof.wrap(gptq, "gptq_quantize_batch", "gptq solve")
    prof.wrap(awq, "awq_scale_search", "awq scale search")
    prof.wrap(awq, "awq_clip_search", "awq clip search")
    prof.wrap(int8_dynamic, "smooth_layer", "smoothquant (incl. its forward)")
    prof.wrap(engine._LayerCalibration, "observe", "calibration forward (incl. hooks)")
    prof.wrap(runtime.ModelRunner, "load_layer", "load: read")
    prof.wrap(engine, "apply_record", "propagate: quantized weights into the layer")
    # The export runs in its own thread beside the engine (each layer while the next is
    # computed): these overlap the engine's stages, and what they do not hide shows as
    # engine.export hand-off (the engine waiting for the previous layer's export) and as
    # "export after the last layer" (the last layer's export, a rotation's tensors, the last shard).
    prof.wrap(export, "export_layer", "export beside the engine: per layer", sync=False)
    prof.wrap(checkpoint.CheckpointWriter, "pack_stack", "export beside the engine: stacked packing", sync=False)
    prof.wrap(checkpoint.CheckpointWriter, "add_quantized", "export beside the engine: per-Linear packing and write",
              sync=False)
    prof.wrap(checkpoint.CheckpointWriter, "add_packed", "export beside the engine: write stacked Linears", sync=False)
    prof.wrap(checkpoint.CheckpointWriter, "add", "export beside the engine: write float tensors", sync=False)
    # Inside those: the export's own stages, whichever path (per Linear or stacked) calls them.
    from quantkit import workdir
    from quantkit.formats import compressed_tensors

    prof.wrap(compressed_tensors.CompressedTensorsFormat, "weight_tensors", "export stage: packing (per Linear)",
              sync=False)
    prof.wrap(checkpoint, "to_host", "export stage: copies off the device", sync=False)
    prof.wrap(checkpoint, "check_written", "export stage: host checks", sync=False)
    prof.wrap(checkpoint.CheckpointWriter, "_write", "export stage: file writes", sync=False)
    # The work folder's layer writer (the record --resume replays), in a thread of its own.
    prof.wrap(workdir.WorkDir, "_write_layer", "work folder: layer record written (own thread)", sync=False)
    prof.wrap(export, "copy_untouched_sources", "run: export beside the engine: copy untouched source tensors",
              sync=False)
    prof.wrap(export.StreamingExport, "finish", "run: export after the last layer")
    # Fixed cost, once per run.
    prof.wrap(preflight, "check_run", "run: validation")
    # Inside validation: the meta skeleton, the layer graphs (derived on the first call in a
    # process), the checkpoint-name mapping (transformers' conversion table built on its first call).
    prof.wrap(view, "build_meta", "run: validation: model skeleton")
    prof.wrap(view, "derive_model_graph", "run: validation: layer graphs")
    prof.wrap(view, "CheckpointNames", "run: validation: checkpoint names")
    prof.wrap(runtime.ModelRunner, "__init__", "run: model class and layer graph")
    prof.wrap(pipeline, "check_source_tensors", "run: finite check of embedding/head")
    prof.wrap(pipeline, "load_tokens", "run: calibration text")


def worker_quantkit(method: str, model: Path, calib: Path, out: Path, n: int, length: int, batch: int) -> dict:
    _cuda_init()
    py_profile = os.environ.get("QK_BENCH_PY_PROFILE")
    if py_profile:  # --py-profile: the main thread's Python calls, imports included
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()  # the tool's imports count, as llm-compressor's do
    import quantkit
    # What a run imports, inside the timed imports (quantize imports them on its first call).
    from quantkit import checkpoint, engine, export, pipeline, preflight  # noqa: F401
    from quantkit.graph import runtime, view  # noqa: F401
    from quantkit.quantizers import awq, gptq, hessian, int8_dynamic, smoothquant  # noqa: F401
    import transformers.modeling_utils  # noqa: F401 (quantkit builds the model's own class: its import cost)

    imported = time.perf_counter() - t0
    prof = _Profile()
    if os.environ.get("QK_BENCH_STAGE_PROFILE") or os.environ.get("QK_BENCH_TORCH_PROFILE"):
        _wrap_stages(prof)
    recipe = _quantkit_recipe(method, model, calib, out, n, length, batch)
    tables = os.environ.get("QK_BENCH_TORCH_PROFILE")
    if tables:
        report = _torch_profiled(lambda: quantkit.quantize(**recipe, quiet=True), Path(tables))
    else:
        report = quantkit.quantize(**recipe, quiet=True)
    wall = time.perf_counter() - t0
    if py_profile:
        profiler.disable()
        _write_py_profile(profiler, Path(py_profile))
    return {"wall_s": wall, **_gpu_peaks(), "rss_gib": _peak_rss_bytes() / GIB,
            "out_gib": _dir_bytes(out) / GIB, "phases": report["timing"]["phase_seconds"],
            "layer_seconds": report["timing"]["layer_seconds"],
            "profile": {"run: imports": imported, **prof.seconds}, "profile_calls": prof.calls}


def _write_py_profile(profiler, tables: Path) -> None:
    """The slowest calls by cumulative and by own time (the raw statistics beside them, for
    ``pstats``' callers). cProfile slows Python-bound stages (not the device's): its shares point
    at the fixed cost, its wall time is not a measurement."""
    import io
    import pstats

    profiler.dump_stats(str(tables.with_suffix(".pstats")))
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(40)
    tables.write_text(text.getvalue())


def _torch_profiled(run, tables: Path) -> dict:
    """``run()`` under torch's profiler; its op tables (by the device's own time and by host time,
    the stage rows of ``_Profile`` among them) written to ``tables``. The profiler slows the run:
    its wall time is not a measurement, its shares are."""
    import torch

    kinds = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=kinds) as prof:
        report = run()
    ops = prof.key_averages()
    by_device = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    tables.write_text(f"by {by_device}\n{ops.table(sort_by=by_device, row_limit=45)}\n\n"
                      f"by cpu_time_total\n{ops.table(sort_by='cpu_time_total', row_limit=45)}\n")
    return report


def worker_llmcompressor(method: str, model_dir: Path, calib: Path, out: Path, n: int, length: int) -> dict:
    import torch  # torch and CUDA's start are outside both tools' wall time

    _cuda_init()
    t0 = time.perf_counter()  # the tool's imports count, as quantkit's do
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = {
        # Routers stay float (MoE cases; they match nothing in dense ones).
        "gptq": lambda: GPTQModifier(targets="Linear", scheme="W4A16",
                                     ignore=["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"]),
        "awq": lambda: AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"]),
        "w8a8": lambda: [SmoothQuantModifier(smoothing_strength=0.8),
                         GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
        "fp8": lambda: QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
    }[method]()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    ids = load_file(str(calib))["input_ids"][:n, :length]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t1 = time.perf_counter()
    kwargs = {} if method == "fp8" else {"dataset": ds, "num_calibration_samples": n, "max_seq_length": length}
    oneshot(model=model, recipe=recipe, **kwargs)
    t2 = time.perf_counter()
    model.save_pretrained(str(out), save_compressed=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "oneshot_s": t2 - t1, **_gpu_peaks(), "rss_gib": _peak_rss_bytes() / GIB,
            "out_gib": _dir_bytes(out) / GIB}


# ---------------------------------------------------------------- driver

def worker_env(work: Path) -> dict[str, str]:
    """The workers' environment, with a bytecode cache under ``work``. An installed package
    has its modules' bytecode (pip writes it), which the GPU machines' image lacks for torch,
    sympy, numpy and triton while it sets PYTHONDONTWRITEBYTECODE: there each worker compiled
    ~1,700 modules from source, seconds of both tools' imports that no user pays."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONPYCACHEPREFIX=str(work / "bytecode"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


_TOOL_IMPORTS = {"quantkit": "import quantkit.pipeline, quantkit.quantizers.gptq, transformers.modeling_utils",
                 "llmcompressor": "import llmcompressor, datasets, transformers.modeling_utils"}


def fill_bytecode(tools: list[str], work: Path) -> None:
    """Each tool's imports once, untimed, in the workers' environment: its bytecode cache is
    then what an installation has, for both tools alike."""
    for tool in tools:
        subprocess.run([sys.executable, "-c", f"import torch; {_TOOL_IMPORTS[tool]}"], env=worker_env(work),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def run_case(case: str, tool: str, work: Path, n: int, length: int, batch: int, timeout: float) -> dict:
    shape, layers, method = CASES[case]
    if shape in MOE_SHAPES:
        model = build_moe_model(shape, layers, work / f"model-{shape}-{layers}")
        vocab = MOE_SHAPES[shape]["config"].get("vocab_size", CALIBRATION_VOCAB)
    else:
        model = build_model(shape, layers, work / f"model-{shape}-{layers}")
        vocab = CALIBRATION_VOCAB
    calib = build_calibration(work / f"calib-{n}x{length}-{vocab}.safetensors", n, length, vocab=vocab)
    os.sync()  # the model just written must not be flushed to disk during a timed run
    out = work / f"out-{case}-{tool}"
    # A run killed earlier (a device call's time limit) leaves quantkit's unfinished work beside
    # its output, which quantkit rightly refuses to mix with a new run: this is a new run.
    from quantkit.checkpoint import work_dir_for

    shutil.rmtree(work_dir_for(out), ignore_errors=True)
    result_file = work / f"result-{case}-{tool}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "worker", tool, method, str(model), str(calib), str(out), str(n), str(length),
           str(batch), str(result_file)]
    env = worker_env(work)
    log = work / f"log-{case}-{tool}.txt"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:  # a result too: the tool did not finish in the time given
            shutil.rmtree(out, ignore_errors=True)
            return {"error": f"not finished after {timeout:.0f} s (--timeout)", "log_tail": log.read_text()[-3000:]}
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0 or not result_file.is_file():
        tail = log.read_text()[-3000:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(result_file.read_text())


def have_llmcompressor() -> bool:
    import importlib.util

    return importlib.util.find_spec("llmcompressor") is not None


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def table(results: dict, peers_measured: bool) -> str:
    earlier = [r["llmcompressor"]["from"] for r in results.values() if "from" in r.get("llmcompressor", {})]
    peer = (f"llm-compressor (from {earlier[0]})" if earlier else "llm-compressor (measured here)" if peers_measured
            else "llm-compressor (reference table)")
    lines = [f"| case | quantkit wall s | {peer} wall s | ratio | quantkit GPU GiB | peer GPU GiB | ratio | "
             "quantkit RSS GiB | peer RSS GiB | ratio | quantkit out GiB | peer out GiB |",
             "|" + "---|" * 13]
    for case, r in results.items():
        q = r.get("quantkit", {})
        p = r.get("llmcompressor") or REFERENCE.get(case, {})
        src = "" if "llmcompressor" in r else " (ref)" if case in REFERENCE else ""
        if "error" in q:
            lines.append(f"| {case} | quantkit failed: {q['error']} |")
            continue
        if "error" in p:
            p, src = REFERENCE.get(case, {}), " (ref; llmc failed)"
        cells = [case + src]
        for key in ("wall_s", "gpu_gib", "rss_gib"):
            cells += [f"{q.get(key, 0):.1f}", f"{p[key]:.1f}" if key in p else "-", fmt_ratio(q.get(key), p.get(key))]
        cells += [f"{q.get('out_gib', 0):.2f}", f"{p['out_gib']:.2f}" if "out_gib" in p else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_table(results: dict) -> str:
    lines = ["| case | s/layer | stage: seconds per layer | once per run: seconds |", "|---|---|---|---|"]
    for case, r in results.items():
        q = r.get("quantkit", {})
        if "phases" not in q:
            continue
        layers = CASES[case][1]
        per_layer = sum(q["layer_seconds"]) / max(len(q["layer_seconds"]), 1)
        stages = {**{f"engine.{k}": v for k, v in q["phases"].items()}, **q["profile"]}
        cells = ", ".join(f"{k} {v / layers:.2f}" for k, v in stages.items() if not k.startswith("run: "))
        once = ", ".join(f"{k[5:]} {v:.2f}" for k, v in stages.items() if k.startswith("run: "))
        lines.append(f"| {case} | {per_layer:.2f} | {cells} | {once} |")
    return "\n".join(lines)


def extrapolation(results: dict) -> str:
    lines = ["| model | from case | quantkit s/layer | fixed s | est. full model (quantkit) | "
             "est. full model (llm-compressor, same method) |", "|---|---|---|---|---|---|"]
    for case, r in results.items():
        q = r.get("quantkit", {})
        if "layer_seconds" not in q or not q["layer_seconds"]:
            continue
        shape, layers, _ = CASES[case]
        per_layer = sum(q["layer_seconds"]) / len(q["layer_seconds"])
        # The export runs beside the layers (its waits are in their seconds); what is left after
        # the last layer (one layer's export, the last shard) is fixed, as the embedding is.
        fixed = q["wall_s"] - sum(q["layer_seconds"])
        targets = MOE_EXTRAPOLATE.get(shape) or [(f"{SHAPES[shape]['name']} ({SHAPES[shape]['full_layers']} layers)",
                                                   1.0, SHAPES[shape]["full_layers"])]
        p = r.get("llmcompressor") or REFERENCE.get(case)
        for name, factor, full in targets:
            est = fixed + full * factor * per_layer
            peer = "-"
            if p and "wall_s" in p:
                peer = f"~{p['wall_s'] / layers * full * factor / 60:.1f} min (linear in layers)"
            lines.append(f"| {name} | {case} | {per_layer * factor:.2f} | {fixed:.1f} | ~{est / 60:.1f} min | {peer} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        tool, method, model, calib, out, n, length, batch, result = argv[1:]
        if tool == "quantkit":
            r = worker_quantkit(method, Path(model), Path(calib), Path(out), int(n), int(length), int(batch))
        else:
            r = worker_llmcompressor(method, Path(model), Path(calib), Path(out), int(n), int(length))
        Path(result).write_text(json.dumps(r, indent=2))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(c for c in CASES if c not in MOE_CASES and c not in GPTAQ_CASES
                                     and c not in SHIPPED_CASES),
                    help="comma-separated; 'moe' for the Mixture-of-Experts cases")
    ap.add_argument("--tiny", action="store_true", help="check the script on the CPU with tiny MoE shapes "
                    "(a smoke test, not a measurement)")
    ap.add_argument("--cpu-wide", action="store_true", help="on the CPU, the Qwen3-MoE case with 32 experts at "
                    "hidden 512 (a measurement of per-expert overheads; use with --cases moe-gptq-qwen3-30b-2)")
    ap.add_argument("--drop-models", action="store_true",
                    help="delete each case's model folder after its runs (MoE models are 5-26 GB)")
    ap.add_argument("--tools", default="quantkit,llmcompressor")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="turn off torch's cuDNN attention backend in both tools: whether the first layer of each "
                    "attention kind (Gemma 3's sliding and global) pays cuDNN's plan building")
    ap.add_argument("--torch-profile", action="store_true",
                    help="run quantkit under torch's profiler: its op tables go to <work>/torch-profile-<case>.txt "
                    "and are printed (the run is slower: its times are not measurements)")
    ap.add_argument("--stage-profile", action="store_true",
                    help="time quantkit's stages per call (synchronising the device at each: its wall time is "
                         "then not a measurement); without it only the engine's own per-stage seconds are kept")
    ap.add_argument("--py-profile", action="store_true",
                    help="run quantkit under cProfile (imports included): the slowest calls go to "
                         "<work>/py-profile-<case>.txt and the output")
    ap.add_argument("--work", default="/tmp/quantkit-gpu-bench")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="quantkit calibration.batch_size")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--peer-results", help="an earlier run's --json: take llm-compressor's rows from it "
                    "instead of running it again (same machine kind, same cases)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.no_cudnn_sdpa:
        os.environ["QK_BENCH_NO_CUDNN_SDPA"] = "1"
    if args.stage_profile:
        os.environ["QK_BENCH_STAGE_PROFILE"] = "1"
    if args.tiny or args.cpu_wide:
        global DEVICE
        DEVICE = os.environ["QK_BENCH_DEVICE"] = "cpu"
        for s in MOE_SHAPES.values():
            s["config"].update(_CPU_WIDE if args.cpu_wide and s["model_type"] == "qwen3_moe"
                               else _TINY.get(s["model_type"], {}))
    tools = args.tools.split(",")
    if "llmcompressor" in tools and not have_llmcompressor() and not args.peer_results:
        print("llm-compressor is not installed here: peers are the reference table's numbers", flush=True)
        tools.remove("llmcompressor")
    results: dict = {}
    fill_bytecode(tools, work)
    earlier = json.loads(Path(args.peer_results).read_text()) if args.peer_results else {}
    cases = [c for entry in args.cases.split(",") for c in (MOE_CASES if entry == "moe" else [entry])]
    for case in cases:
        results[case] = {}
        for tool in tools:
            old = earlier.get(case, {}).get(tool)
            if tool == "llmcompressor" and old and "error" not in old:
                results[case][tool] = {**old, "from": args.peer_results}
                print(f"{case} {tool}: from {args.peer_results}", flush=True)
                continue
            t = time.perf_counter()
            tables = work / f"torch-profile-{case}.txt"
            if args.torch_profile and tool == "quantkit":
                os.environ["QK_BENCH_TORCH_PROFILE"] = str(tables)
            py_tables = work / f"py-profile-{case}.txt"
            if args.py_profile and tool == "quantkit":
                os.environ["QK_BENCH_PY_PROFILE"] = str(py_tables)
            results[case][tool] = r = run_case(case, tool, work, args.samples, args.seq_len, args.batch_size,
                                               args.timeout)
            print(f"{case} {tool}: {json.dumps({k: v for k, v in r.items() if k != 'log_tail'})[:400]} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            if "log_tail" in r:
                print(r["log_tail"], flush=True)
            if os.environ.pop("QK_BENCH_TORCH_PROFILE", None) and tables.is_file():
                print(tables.read_text(), flush=True)
            if os.environ.pop("QK_BENCH_PY_PROFILE", None) and py_tables.is_file():
                print(py_tables.read_text(), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        if args.drop_models:
            shape, layers, _ = CASES[case]
            shutil.rmtree(work / f"model-{shape}-{layers}", ignore_errors=True)
    measured = any("llmcompressor" in r for r in results.values())
    print()
    print(table(results, measured))
    print("\nquantkit per-layer profile (stages are nested: calibration forward includes the hooks' "
          "Hessian accumulation; quantize includes forward, hooks and solve)")
    print(profile_table(results))
    print("\nExtrapolation to full models (per-layer time x layers + fixed cost; an estimate, not a run)")
    print(extrapolation(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
