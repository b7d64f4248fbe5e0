"""Tiny Llama/Qwen2/Mistral-shaped models with random weights and a locally trained tokenizer.

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


def make_tiny_model(out_dir: Path, arch: str = "llama", layers: int = 2, hidden: int = 128,
                    intermediate: int = 256, heads: int = 4, kv_heads: int = 2, tied: bool = False,
                    seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB") -> Path:
    """Write a random-weight model folder (config, safetensors, tokenizer); return it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    config = config_cls(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=1024, tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norms, so folding is tested
            elif p.dim() == 2:
                p.normal_(0, 0.02 if "embed" in name else hidden ** -0.5)
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
