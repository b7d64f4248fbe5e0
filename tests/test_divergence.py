"""KL divergence and top-1 agreement of the quantized model's next-token distribution from
the base model's: the pure math against a float64 reference, chunking, and the engine's
numbers against transformers' logits of the written checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from quantkit import pipeline
from quantkit.divergence import compare_streams, quantile, token_kl, top1_agreement
from quantkit.recipe import make_recipe


def _kl64(base: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """sum_v p(v) (log p(v) - log q(v)) written out in float64."""
    b, q = base.double(), quant.double()
    lp = b - b.max(-1, keepdim=True).values
    lp = lp - lp.exp().sum(-1, keepdim=True).log()
    lq = q - q.max(-1, keepdim=True).values
    lq = lq - lq.exp().sum(-1, keepdim=True).log()
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("seed,rows,vocab,scale", [(0, 64, 50, 1.0), (1, 17, 1000, 8.0), (2, 5, 32000, 3.0)])
def test_token_kl_matches_float64(seed, rows, vocab, scale):
    g = torch.Generator().manual_seed(seed)
    base = scale * torch.randn(rows, vocab, generator=g)
    quant = base + 0.3 * torch.randn(rows, vocab, generator=g)
    got = token_kl(base, quant)
    want = _kl64(base, quant)
    # float32 log-softmax over up to 32k entries: 1e-5 nats absolute is its rounding.
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), (got.double() - want).abs().max()
    assert torch.all(token_kl(base, base) < 1e-6)
    # bf16 logits (what a GPU run holds) go through the same float32 math
    assert torch.allclose(token_kl(base.bfloat16(), quant.bfloat16()).double(),
                          _kl64(base.bfloat16(), quant.bfloat16()), rtol=1e-4, atol=1e-5)


def test_top1_agreement_and_quantile_match_references():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 30, generator=g)
    quant = base + torch.randn(200, 30, generator=g)
    got = top1_agreement(base, quant)
    want = np.argmax(base.numpy(), -1) == np.argmax(quant.numpy(), -1)
    assert got.tolist() == want.tolist() and 0 < want.sum() < 200
    for n in (1, 2, 101, 1000):
        v = torch.rand(n, generator=g)
        for q in (0.0, 0.5, 0.99, 1.0):
            assert quantile(v, q) == pytest.approx(float(np.quantile(v.double().numpy(), q)), abs=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 8 * 40 * 7, 8 * 40 * 20, 1 << 30])
def test_compare_streams_chunks_never_hold_all_logits(chunk_bytes):
    """Any chunk size gives the float64 whole-tensor numbers; no head call sees more positions
    than the budget, and each sees the token ids of its own positions."""
    g = torch.Generator().manual_seed(4)
    vocab, d = 40, 16
    head_w = torch.randn(vocab, d, generator=g)
    token_bias = torch.randn(vocab, vocab, generator=g)  # the head reads the ids: a misplaced one shows
    batches = [(torch.randn(2, 9, d, generator=g), torch.randn(2, 9, d, generator=g),
                torch.randint(0, vocab, (2, 9), generator=g), torch.randint(0, vocab, (2, 9), generator=g))
               for _ in range(3)]
    seen: list[int] = []

    def head(h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        assert ids.shape == h.shape[:2]
        seen.append(ids.numel())
        return h @ head_w.T + token_bias[ids]

    got = compare_streams(iter(batches), head, vocab, chunk_bytes=chunk_bytes)
    budget = max(1, chunk_bytes // (2 * 4 * vocab))
    assert max(seen) <= budget and sum(seen) == 2 * 3 * 2 * 9

    hb = torch.cat([b.reshape(-1, d) for b, _, _, _ in batches]).double()
    hq = torch.cat([q.reshape(-1, d) for _, q, _, _ in batches]).double()
    bias = token_bias.double()[torch.cat([i.reshape(-1) for _, _, i, _ in batches])]
    t = torch.cat([x.reshape(-1) for _, _, _, x in batches])
    lb, lq = hb @ head_w.double().T + bias, hq @ head_w.double().T + bias
    kl = _kl64(lb, lq)
    nll_b = -torch.log_softmax(lb, -1).gather(1, t[:, None]).mean()
    nll_q = -torch.log_softmax(lq, -1).gather(1, t[:, None]).mean()
    div = got.divergence()
    assert div["positions"] == len(t)
    assert div["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert div["kl_p99"] == pytest.approx(float(np.quantile(kl.numpy(), 0.99)), rel=1e-5)
    assert div["top1_agreement"] == pytest.approx(float((lb.argmax(-1) == lq.argmax(-1)).double().mean()))
    assert got.perplexity_base == pytest.approx(math.exp(float(nll_b)), rel=1e-5)
    assert got.perplexity_quantized == pytest.approx(math.exp(float(nll_q)), rel=1e-5)


@pytest.mark.parametrize("chunk_positions", [None, 7])
def test_engine_divergence_matches_transformers_on_the_checkpoint(tiny_llama, text_file, tmp_path, monkeypatch,
                                                                  chunk_positions):
    """The streaming pass's KL, top-1 agreement and perplexities equal those computed from the
    full logits of the base model and of the written checkpoint, both loaded by transformers;
    also where the model's own head runs on chunks of 7 positions, none of them larger."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit import engine
    from quantkit.calibration import TextRequest, load_tokens

    seen: list[int] = []
    if chunk_positions:
        def small_chunks(streams, head, vocab_size):
            def counted(h, ids):
                seen.append(ids.numel())
                return head(h, ids)
            return compare_streams(streams, counted, vocab_size, chunk_bytes=chunk_positions * 2 * 4 * vocab_size)
        monkeypatch.setattr(engine, "compare_streams", small_chunks)
    out = tmp_path / "out"
    recipe = {"model": {"id": str(tiny_llama)},
              "quantization": {"method": "rtn", "bits": 4, "group_size": 64},
              "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 32},
              "evaluate": {"source": str(text_file), "num_samples": 4, "max_seq_length": 48},
              "export": {"output_dir": str(out)}}
    report = pipeline.run(make_recipe(recipe), quiet=True)
    ev = report["evaluation"]
    assert json.loads((out / "report.json").read_text())["evaluation"] == ev

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    windows = load_tokens(TextRequest(str(text_file), 4, 48, True, 0, False, section="evaluate"), tokenizer, tiny_llama)
    tokens = torch.stack(windows)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(tokens).logits[:, :-1]
        quant = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(tokens).logits[:, :-1]
    base, quant = base.reshape(-1, base.shape[-1]).double(), quant.reshape(-1, quant.shape[-1]).double()
    kl = _kl64(base, quant)
    assert ev["positions"] == len(kl) == 4 * 47
    assert 1e-4 < ev["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-6)
    assert ev["kl_p99"] == pytest.approx(float(np.quantile(kl.numpy(), 0.99)), rel=1e-3)
    assert ev["kl_p99"] > ev["kl_mean"]
    agree = float((base.argmax(-1) == quant.argmax(-1)).double().mean())
    assert 0 < ev["top1_agreement"] < 1 and ev["top1_agreement"] == pytest.approx(agree, abs=1.5 / len(kl))
    target = tokens[:, 1:].reshape(-1)
    ppl_q = math.exp(float(-torch.log_softmax(quant, -1).gather(1, target[:, None]).mean()))
    assert ev["perplexity_quantized"] == pytest.approx(ppl_q, rel=1e-4)
    if chunk_positions:
        assert max(seen) == chunk_positions and sum(seen) == 2 * 4 * 47

    card = (out / "README.md").read_text()
    assert f"KL divergence mean {ev['kl_mean']:.4f} nats, p99 {ev['kl_p99']:.4f}" in card
    assert f"agrees at {100 * ev['top1_agreement']:.2f}% of positions" in card
