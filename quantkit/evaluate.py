"""Perplexity of a saved model or quantized checkpoint, through transformers.

transformers decompresses compressed-tensors/GPTQ/AWQ checkpoints on load, so this measures
what a user will actually load. For models larger than memory the layerwise engine measures
perplexity during ``run`` instead (base and quantized in one streaming pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .calibration import TextRequest, load_tokens
from .engine import make_batches, perplexity
from .model import load_tokenizer, read_config, resolve_model_dir
from .shard_check import read_entries


def evaluate_checkpoint(checkpoint: str | Path, source: str = "shakespeare-eval", num_samples: int = 16,
                        max_seq_length: int = 512, batch_size: int = 4) -> dict[str, Any]:
    from transformers import AutoConfig

    from .graph.skeleton import model_class

    path = resolve_model_dir(str(checkpoint))
    read_config(path / "config.json", quantized_ok=True)
    for shard in sorted(path.glob("*.safetensors")):  # a damaged file is one line, not a loader traceback
        read_entries(shard)
    tokenizer = load_tokenizer(path)
    # The class config.json names: a multimodal checkpoint (Qwen2.5-VL) has no causal-LM auto class.
    cls = model_class(AutoConfig.from_pretrained(path, trust_remote_code=False), str(checkpoint))
    model = cls.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
    tokens = load_tokens(TextRequest(source, num_samples, max_seq_length, True, 0, False), tokenizer, path)
    ppl = perplexity((model(batch).logits[:, :-1], batch) for batch in make_batches(tokens, batch_size))
    return {"checkpoint": str(checkpoint), "perplexity": ppl, "source": source,
            "num_windows": len(tokens), "seq_len": max_seq_length}
