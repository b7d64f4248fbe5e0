"""Self-generated calibration: text sampled from the model being quantized.

Needs no dataset at all, so it works offline for any model. Each sequence starts from a
different random vocabulary token (after BOS) and is sampled with temperature 1 and top-k,
which covers the model's own distribution better than greedy text would. Every draw comes
from a generator seeded from the recipe's seed and the batch (``quantkit.seeding``), so the
same recipe samples the same text; transformers' ``generate`` would draw from the global RNG.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import seeding

log = logging.getLogger(__name__)

TOP_K = 50


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
    special = set(tok.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tok)) if i not in special])
    ends = model.generation_config.eos_token_id
    ends = sorted({*(ends if isinstance(ends, list) else [ends]), tok.eos_token_id} - {None})
    out: list[torch.Tensor] = []
    log.info("sampling %d calibration sequences of %d tokens from the model", num_samples, max_seq_length)
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        gen = seeding.generator(seed, "self-generated", start)
        first = vocab[torch.randint(len(vocab), (n,), generator=gen)][:, None]
        prompt = torch.cat([torch.full((n, 1), tok.bos_token_id), first], 1) if tok.bos_token_id is not None else first
        new = max_seq_length - prompt.shape[1]
        # Greedy decoding over scores where only the token the processor sampled is finite:
        # generate keeps its own KV-cache handling, the draw is ours.
        with torch.no_grad():
            seqs = model.generate(prompt.to(model.device), do_sample=False, min_new_tokens=new, max_new_tokens=new,
                                  logits_processor=LogitsProcessorList([SeededTopK(gen, ends)]),
                                  pad_token_id=ends[0] if ends else None)
        out.extend(s.cpu() for s in seqs)
    del model
    return out


class SeededTopK(LogitsProcessor):
    """Samples the next token at temperature 1 from the ``top_k`` most likely (never an end of
    sequence: every sequence gets the length asked for) with ``generator``, and returns scores
    where only that token is finite."""

    def __init__(self, generator: torch.Generator, banned: list[int], top_k: int = TOP_K) -> None:
        self.generator, self.banned, self.top_k = generator, banned, top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float().clone()
        logits[:, self.banned] = float("-inf")
        top = logits.topk(min(self.top_k, logits.shape[-1]))
        pick = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=self.generator)
        chosen = top.indices.gather(1, pick.to(top.indices.device))
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)
