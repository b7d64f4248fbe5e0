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


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out_dir)
    return fast


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
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")


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
    tokenizer = build_tokenizer(out_dir)
    config = family_config(arch, len(tokenizer), layers, hidden, intermediate, heads, kv_heads, tied,
                           tokenizer.bos_token_id, tokenizer.eos_token_id)
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
    return out_dir


def write_text_file(path: Path, n_docs: int = 40) -> Path:
    """A small local .jsonl of project-written text for calibration tests."""
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(_TEXT[(i + k) % len(_TEXT)] for k in range(3))}) + "\n")
    return path
