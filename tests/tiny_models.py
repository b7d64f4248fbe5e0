"""Tiny models of every supported family with random weights and a locally trained tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with the `tokenizers`
library on project-written text, and weights come from a seeded random init.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.shipped import calibration_bytes

_TEXT = [json.loads(line)["messages"][1]["content"]
         for line in calibration_bytes("quantkit-chat.jsonl").decode().splitlines()]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# A multimodal family's image/video marker tokens, as its processor reads them from the
# tokenizer; appended in this order, so they take the last ids, where `family_config` puts them.
# vLLM's Gemma 3 processing also looks up runs of newlines by text, as Gemma's vocabulary has
# them (`gemma3_mm.py`: ``vocab["\n\n"]``); they are added before the markers.
NEWLINE_TOKENS = {"gemma3-vl": ["\n" * k for k in range(1, 5)]}
MEDIA_TOKENS = {
    "gemma3-vl": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "qwen2.5-vl": {"vision_end_token": "<|vision_end|>", "vision_start_token": "<|vision_start|>",
                   "video_token": "<|video_pad|>", "image_token": "<|image_pad|>"},
}


def build_tokenizer(out_dir: Path, vocab_size: int = 384, media: dict[str, str] | None = None,
                    words: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT * 4, trainer)
    tok.add_tokens(words or [])
    tok.add_special_tokens(list((media or {}).values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE, extra_special_tokens=media or {})
    fast.save_pretrained(out_dir)
    return fast


def write_processor_files(out_dir: Path, arch: str, config) -> None:
    """The processor configs a released multimodal checkpoint ships (vLLM builds its input
    processor from them), sized for the tiny vision tower: one 28 x 28 image is 4 patches."""
    vision = config.vision_config
    mean_std = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    if arch == "gemma3-vl":
        side = vision.image_size
        files = {"preprocessor_config.json": {"image_processor_type": "Gemma3ImageProcessor",
                                              "processor_class": "Gemma3Processor", "do_resize": True,
                                              "size": {"height": side, "width": side}, "resample": 2,
                                              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                                              **mean_std},
                 "processor_config.json": {"processor_class": "Gemma3Processor",
                                           "image_seq_length": config.mm_tokens_per_image}}
    else:
        patch = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                 "merge_size": vision.spatial_merge_size, "min_pixels": 28 * 28, "max_pixels": 4 * 28 * 28}
        files = {"preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor",
                                              "processor_class": "Qwen2_5_VLProcessor", **patch, **mean_std},
                 "video_preprocessor_config.json": {"video_processor_type": "Qwen2VLVideoProcessor",
                                                    "processor_class": "Qwen2_5_VLProcessor", **patch, **mean_std}}
    for name, body in files.items():
        (out_dir / name).write_text(json.dumps(body, indent=2))


def family_config(arch: str, vocab: int, layers: int = 2, hidden: int = 128, intermediate: int = 256,
                  heads: int = 4, kv_heads: int = 2, tied: bool = False, bos: int = 1, eos: int = 2):
    """A config from the family's own transformers config class, with tiny dimensions.

    Two-layer models alternate the layer types a family has (Gemma 2/3: sliding window then
    global attention, with a window shorter than the test sequences)."""
    import transformers as tf

    head_dim = hidden // heads
    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                  max_position_embeddings=1024, tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=eos,
                  pad_token_id=None)
    alternating = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(layers)]
    gemma = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16, layer_types=alternating,
                 hidden_activation="gelu_pytorch_tanh")
    text = {
        "llama": lambda: tf.LlamaConfig(**common, rms_norm_eps=1e-5),
        "qwen2": lambda: tf.Qwen2Config(**common, rms_norm_eps=1e-5),
        "mistral": lambda: tf.MistralConfig(**common, rms_norm_eps=1e-5),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=head_dim, rms_norm_eps=1e-5),
        "gemma2": lambda: tf.Gemma2Config(**common, **gemma, attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, **gemma),
        "phi3": lambda: tf.Phi3Config(**common, rms_norm_eps=1e-5),
        "olmo2": lambda: tf.Olmo2Config(**common, rms_norm_eps=1e-5),
        "cohere": lambda: tf.CohereConfig(**common, logit_scale=0.25),
    }
    moe = {  # Mixture-of-Experts: 4 experts, 2 routed per token
        "mixtral": lambda: tf.MixtralConfig(**common, rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, rms_norm_eps=1e-5, moe_intermediate_size=intermediate // 2,
                                               shared_expert_intermediate_size=intermediate, num_experts=4,
                                               num_experts_per_tok=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, head_dim=head_dim, rms_norm_eps=1e-5,
                                               moe_intermediate_size=intermediate // 2, num_experts=4,
                                               num_experts_per_tok=2),
        # MLA attention (norms between its projections), a first dense layer, a shared expert,
        # group-limited routing with a score-correction bias
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": heads}, rms_norm_eps=1e-5, moe_intermediate_size=intermediate // 2,
            n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 2, qk_rope_head_dim=16,
            qk_nope_head_dim=head_dim - 16, v_head_dim=head_dim),
        # attention sinks, biased experts with a clamped gate, transposed and interleaved gate/up
        "gpt_oss": lambda: tf.GptOssConfig(
            **{**common, "intermediate_size": intermediate // 2}, head_dim=head_dim, rms_norm_eps=1e-5,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]),
        # Llama 4 text: a dense layer then a MoE layer (router weight on the experts' input, a
        # shared expert, top-1 routing), chunked attention with RoPE then global attention without
        "llama4_text": lambda: tf.Llama4TextConfig(
            **{**common, "intermediate_size": intermediate // 2}, intermediate_size_mlp=intermediate,
            head_dim=head_dim, rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=2, no_rope_layers=[int((i + 1) % 2 != 0) for i in range(layers)],
            attention_chunk_size=16),
    }
    if arch in text:
        return text[arch]()
    if arch in moe:
        return moe[arch]()
    if arch == "gemma3-vl":
        text_cfg = {k: v for k, v in {**common, **gemma}.items() if k not in ("tie_word_embeddings",)}
        return tf.Gemma3Config(
            text_config=text_cfg, tie_word_embeddings=tied,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=vocab - 1, boi_token_index=vocab - 3, eoi_token_index=vocab - 2)
    if arch == "qwen2.5-vl":
        text_cfg = {k: v for k, v in common.items() if k not in ("tie_word_embeddings",)}
        text_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                       "mrope_section": [head_dim // 8, head_dim // 8 * 1, head_dim // 4]}
        return tf.Qwen2_5_VLConfig(
            text_config=text_cfg, tie_word_embeddings=tied,
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
            image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
            vision_end_token_id=vocab - 4)
    raise KeyError(arch)


TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "cohere")
MULTIMODAL_FAMILIES = ("gemma3-vl", "qwen2.5-vl")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text")


def model_class_for(config):
    """The ForCausalLM / ForConditionalGeneration class a config's family uses."""
    import transformers as tf

    if isinstance(config, tf.Gemma3Config):
        return tf.Gemma3ForConditionalGeneration
    if isinstance(config, tf.Qwen2_5_VLConfig):
        return tf.Qwen2_5_VLForConditionalGeneration
    return tf.AutoModelForCausalLM._model_mapping[type(config)]


def make_tiny_model(out_dir: Path, arch: str = "llama", layers: int = 2, hidden: int = 128,
                    intermediate: int = 256, heads: int = 4, kv_heads: int = 2, tied: bool = False,
                    seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB") -> Path:
    """Write a random-weight model folder (config, safetensors, tokenizer); return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, media=MEDIA_TOKENS.get(arch), words=NEWLINE_TOKENS.get(arch))
    config = family_config(arch, len(tokenizer), layers, hidden, intermediate, heads, kv_heads, tied,
                           tokenizer.bos_token_id, tokenizer.eos_token_id)
    if arch in MULTIMODAL_FAMILIES:
        write_processor_files(out_dir, arch, config)
    torch.manual_seed(seed)
    model = model_class_for(config)._from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norms, so folding is tested
            elif p.dim() == 2:
                p.normal_(0, 0.02 if "embed" in name else hidden ** -0.5)
            elif p.dim() == 3:  # fused experts [E, out, in] (gpt-oss: [E, in, out])
                p.normal_(0, hidden ** -0.5)
            else:
                p.normal_(0, 0.02)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if arch == "gemma3-vl":
        # Released Gemma 3 checkpoints (and vLLM's loader) keep SigLIP's `vision_model` level,
        # which transformers 5 drops on save.
        _rename_tensors(out_dir, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    return out_dir


def _rename_tensors(folder: Path, rename) -> None:
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        save_file({rename(k): v for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        body = json.loads(index.read_text())
        body["weight_map"] = {rename(k): v for k, v in body["weight_map"].items()}
        index.write_text(json.dumps(body, indent=2))


def write_text_file(path: Path, n_docs: int = 40) -> Path:
    """A small local .jsonl of project-written text for calibration tests."""
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(_TEXT[(i + k) % len(_TEXT)] for k in range(3))}) + "\n")
    return path
