"""A probe, not a method: does AutoRound-style block-level rounding on top of quantkit's
offline Hadamard rotation get W4A16 closer to bf16 than the shipped GPTQ row (issue 20)?

    python benchmarks/block_rounding_probe.py --model builtin:smollm2-135m --device cuda \
        --seeds 0,1,2 --iters 200 [--calib 64x256] [--eval 32x256] [--out DIR]

Per decoder layer, on quantized-stream inputs, every Linear's 4-bit asymmetric g64 codes get a
learned rounding offset in [-0.5, 0.5] and each group's range two learned shrink factors,
starting from round-to-nearest or (``--init gptq``) from each Linear's GPTQ codes, by
signed gradient steps (AutoRound's rule: learning rate 1/steps, batch 8, best loss kept) on
the mean squared error against the float layer's output on the float stream. The model is
rotated first exactly as ``quantization.rotate: hadamard`` rotates it (quantkit's own
functions, seed 0). ``--iters 0`` is rotated RTN through the same code.

The calibration and evaluation ids are ``benchmarks/quality.py``'s for the pydoc domain, and
the perplexity is scored in float32 like the peers' in that table (``llmcompressor_parity``'s
``model_perplexity``, on fake-quantized weights): its increase over the original model is comparable with
theirs. Prints one table; each run's result is a JSON line in ``--out``/probe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantkit.quantizers.rtn import weight_only_scheme  # noqa: E402
from quantkit.scheme import QuantizedWeight  # noqa: E402

BITS, GROUP, BATCH = 4, 64, 8
SCHEME = weight_only_scheme(BITS, GROUP, False)
QMAX = 2 ** BITS - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LearnedRounding(nn.Module):
    """One Linear's weight as asymmetric ``BITS``-bit group codes with a learned rounding
    offset per weight and learned shrink factors for each group's minimum and maximum."""

    def __init__(self, weight: torch.Tensor, start: QuantizedWeight | None = None):
        """From round-to-nearest of ``weight``, or with ``start`` from its codes and grid (at
        zero offsets and unit factors the module gives ``start``'s dequantized weight)."""
        super().__init__()
        out, n = weight.shape
        source = weight if start is None else start.dequantize(torch.float32)
        w = source.detach().float().reshape(out, n // GROUP, GROUP)
        self.register_buffer("w", w)
        if start is None:
            self.register_buffer("lo", w.amin(-1, keepdim=True).clamp(max=0))
            self.register_buffer("hi", w.amax(-1, keepdim=True).clamp(min=0))
        else:  # quantkit's asymmetric codes are signed, with a signed zero point
            scale, zero = start.scale.float().unsqueeze(-1), start.zero_point.float().unsqueeze(-1)
            grid = start.scheme.weights.grid
            self.register_buffer("lo", (grid.qmin - zero) * scale)
            self.register_buffer("hi", (grid.qmax - zero) * scale)
        self.v = nn.Parameter(torch.zeros_like(w))
        self.a = nn.Parameter(torch.ones_like(self.lo))
        self.b = nn.Parameter(torch.ones_like(self.hi))

    def forward(self) -> torch.Tensor:
        lo, hi = self.lo * self.a.clamp(0.5, 1.0), self.hi * self.b.clamp(0.5, 1.0)
        scale = ((hi - lo) / QMAX).clamp(min=1e-9)
        zero = round_ste(-lo / scale)
        q = torch.clamp(round_ste(self.w / scale + self.v.clamp(-0.5, 0.5)) + zero, 0, QMAX)
        return ((q - zero) * scale).reshape(self.w.shape[0], -1)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.a.clamp_(0.5, 1.0)
        self.b.clamp_(0.5, 1.0)


def rotate_model(model: nn.Module, seed: int):
    """``quantization.rotate: hadamard``'s edits on a float model in memory (float64 products);
    the model's layer graph, which they follow."""
    from transformers import AutoModelForCausalLM

    from quantkit.graph.model import derive_model_graph
    from quantkit.graph.rotate import rotate_heads, rotate_layer
    from quantkit.graph.skeleton import locate_decoder
    from quantkit.rotation.hadamard import random_hadamard

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    graph = derive_model_graph(skeleton, locate_decoder(skeleton, "probe"))
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    q = random_hadamard(hidden, gen)
    head_dim = getattr(model.config, "head_dim", None) or hidden // model.config.num_attention_heads
    head_q = random_hadamard(head_dim, gen)
    dev = next(model.parameters()).device
    q, head_q = q.to(dev), head_q.to(dev)
    with torch.no_grad():
        norm = model.model.norm.weight.to(torch.float64)
        head = (model.lm_head.weight.to(torch.float64) * norm) @ q
        model.lm_head.weight = nn.Parameter(head.to(model.lm_head.weight.dtype))
        model.config.tie_word_embeddings = False
        emb = model.get_input_embeddings().weight
        emb.copy_((emb.to(torch.float64) @ q).to(emb.dtype))
        model.model.norm.weight.fill_(1.0)
        for i, layer in enumerate(model.model.layers):
            g = graph.layer(i)
            rotate_layer(layer, g, q)
            for group in g.groups:
                if group.producer.kind == "attention_value" and group.producer.exact:
                    rotate_heads(layer, group, head_q)
    return graph


def layer_arguments(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first layer's input for ``ids`` and the keyword arguments the model gives its layers."""
    seen: dict = {}

    class Taken(Exception):
        pass

    def grab(_m, args, kwargs):
        seen["x"], seen["kw"] = args[0] if args else kwargs.pop("hidden_states"), kwargs
        raise Taken

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(ids)
    except Taken:
        pass
    finally:
        handle.remove()
    # No KV cache: each call would append its keys and values (and their autograd graph) to it.
    from transformers.cache_utils import Cache

    kw = {k: v for k, v in seen["kw"].items() if not isinstance(v, Cache) and k != "use_cache"}
    return seen["x"], kw


def run_layer(layer: nn.Module, x: torch.Tensor, kw: dict, weights: dict | None = None) -> torch.Tensor:
    out = torch.func.functional_call(layer, weights, (x,), kw) if weights else layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def gptq_start(layer: nn.Module, graph, linears: dict[str, nn.Linear], xq: torch.Tensor, kw: dict) -> dict:
    """Each Linear's GPTQ codes (W4 g64 asymmetric, act-order static, clip search) under the
    Hessian of its input group (``graph``'s) on the quantized stream, the layer's other
    Linears float."""
    from quantkit.engine import run_calibration
    from quantkit.quantizers.gptq import collect_hessians, gptq_quantize

    accs, stats = collect_hessians(graph)
    run_calibration(layer, {n: s.add for n, s in stats.items()},
                    lambda: [run_layer(layer, c, kw) for c in xq.split(BATCH)])
    return {n: gptq_quantize(m.weight.detach().float(), accs[n].hessian(), SCHEME, name=n, act_order=True,
                             static_groups=True, clip_search=True) for n, m in linears.items()}


def quantize_layer(layer: nn.Module, graph, xq: torch.Tensor, yf: torch.Tensor, kw: dict, iters: int, lr: float,
                   gen: torch.Generator, init: str = "rtn") -> tuple[float, float]:
    """Learn the layer's rounding on (``xq`` → ``yf``) from round-to-nearest or GPTQ's codes
    (``init``), write the dequantized weights into it; the first step's loss and the best one."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    starts = gptq_start(layer, graph, linears, xq, kw) if init == "gptq" else {}
    rounders = {n: LearnedRounding(m.weight, starts.get(n)) for n, m in linears.items()}
    params = [p for r in rounders.values() for p in r.parameters()]
    best, best_loss, first = {n: r().detach() for n, r in rounders.items()}, math.inf, math.nan
    if iters == 0:
        weights = {f"{n}.weight": w for n, w in best.items()}
        with torch.no_grad():
            out = torch.cat([run_layer(layer, c, kw, weights) for c in xq.split(BATCH)])
        first = best_loss = F.mse_loss(out.float(), yf.float()).item()
    for _ in range(iters):
        pick = torch.randint(0, xq.shape[0], (BATCH,), generator=gen).to(xq.device)
        current = {n: r() for n, r in rounders.items()}
        loss = F.mse_loss(run_layer(layer, xq[pick], kw, {f"{n}.weight": w for n, w in current.items()}).float(),
                          yf[pick].float())
        if math.isnan(first):
            first = loss.item()
        if loss.item() < best_loss:
            best_loss, best = loss.item(), {n: w.detach() for n, w in current.items()}
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(lr * p.grad.sign())
        for r in rounders.values():
            r.clamp_()
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(best[n].to(m.weight.dtype))
    return first, best_loss


def probe(model_dir: Path, tokens: Path, device: str, iters: int, lr: float, seed: int, init: str = "rtn") -> dict:
    from llmcompressor_parity import model_perplexity as perplexity
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(str(tokens))
    cal, ev = ids["calibration"].to(device), ids["evaluation"].to(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    base = perplexity(model, ev)
    began = time.perf_counter()
    graph = rotate_model(model, 0)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        firsts = [layer_arguments(model, c) for c in cal.split(BATCH)]
    kw = firsts[0][1]  # every batch of BATCH sequences gets the same arguments
    xf = torch.cat([x for x, _ in firsts])
    del firsts
    xq = xf.clone()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            yf = torch.cat([run_layer(layer, c, kw) for c in xf.split(BATCH)])
        with torch.enable_grad():
            losses.append(quantize_layer(layer, graph.layer(i), xq, yf, kw, iters, lr, gen, init))
        with torch.no_grad():
            xq = torch.cat([run_layer(layer, c, kw) for c in xq.split(BATCH)])
        xf = yf
    seconds = time.perf_counter() - began
    return {"seed": seed, "iters": iters, "lr": lr, "init": init, "ppl_base": base, "ppl": perplexity(model, ev),
            "seconds": seconds, "layer_losses": losses}


def main(argv: list[str] | None = None) -> int:
    import quality

    from quantkit.model import ModelSource

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=quality.MODEL)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws (quality.py's)")
    ap.add_argument("--iters", default="200", help="comma-separated steps per layer (0: rotated RTN)")
    ap.add_argument("--lr", type=float, default=None, help="signed step size (AutoRound's default: 1/steps)")
    ap.add_argument("--init", choices=("rtn", "gptq"), default="rtn",
                    help="start from round-to-nearest (AutoRound's start) or from each Linear's GPTQ codes")
    ap.add_argument("--calib", default="64x256")
    ap.add_argument("--eval", default="32x256")
    ap.add_argument("--out", type=Path, default=Path("/tmp/quantkit-probe"))
    args = ap.parse_args(argv)
    model_dir = ModelSource.open(args.model).path
    calib, evaluation = quality._pair(args.calib), quality._pair(args.eval)
    rows = []
    for iters in (int(i) for i in args.iters.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            tokens = quality.dump_tokens("pydoc", seed, calib, evaluation, args.out, model_dir)
            row = probe(model_dir, tokens, args.device, iters, args.lr or 1.0 / max(iters, 1), seed, args.init)
            rows.append(row)
            with open(args.out / "probe.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{args.init} iters {iters} seed {seed}: ppl {row['ppl']:.3f} (base {row['ppl_base']:.3f}) "
                  f"{row['seconds']:.1f} s", flush=True)
    print("\n| steps | draws | Δ ppl vs float32 base (mean ± 95%) | seconds |\n|---:|---:|---:|---:|")
    for iters in sorted({r["iters"] for r in rows}):
        rs = [r for r in rows if r["iters"] == iters]
        mean, half = quality.interval([100 * (r["ppl"] / r["ppl_base"] - 1) for r in rs])
        ci = "" if math.isnan(half) else f" ± {half:.2f}"
        print(f"| {iters} | {len(rs)} | {mean:+.2f}%{ci} | {sum(r['seconds'] for r in rs) / len(rs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
