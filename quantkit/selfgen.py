"""Self-generated calibration: text sampled from the model being quantized.

Needs no dataset at all, so it works offline for any model. Each sequence starts from a
different random vocabulary token (after BOS) and is sampled with temperature 1 and top-k,
which covers the model's own distribution better than greedy text would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def sample_from_model(model_dir: Path, dtype: torch.dtype, device: torch.device,
                      num_samples: int, max_seq_length: int, seed: int, batch_size: int = 8) -> list[torch.Tensor]:
    """``num_samples`` token sequences of ``max_seq_length`` sampled from the model.

    The whole model is loaded through transformers; on CUDA it is spread with
    ``device_map="auto"`` (offloading what does not fit), so any size works, slowly.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .graph.skeleton import model_class

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    kwargs = {"device_map": "auto"} if device.type == "cuda" else {}
    cls = model_class(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), str(model_dir))
    model = cls.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False, **kwargs).eval()
    if device.type != "cuda":
        model.to(device)
    gen = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    out: list[torch.Tensor] = []
    log.info("sampling %d calibration sequences of %d tokens from the model", num_samples, max_seq_length)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        first = torch.tensor([vocab[i] for i in torch.randint(len(vocab), (n,), generator=gen)])[:, None]
        prompt = torch.cat([torch.full((n, 1), tok.bos_token_id), first], 1) if tok.bos_token_id is not None else first
        torch.manual_seed(seed + start)
        with torch.no_grad():
            seqs = model.generate(prompt.to(model.device), do_sample=True, top_k=50, temperature=1.0,
                                  min_new_tokens=max_seq_length - prompt.shape[1],
                                  max_new_tokens=max_seq_length - prompt.shape[1],
                                  pad_token_id=tok.eos_token_id)
        out.extend(s.cpu() for s in seqs)
    del model
    return out
