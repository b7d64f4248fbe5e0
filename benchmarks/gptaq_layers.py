"""Layer-by-layer diagnosis of GPTQ's input feedback on SmolLM2 (CPU): each variant quantizes
its own copy of the model layer by layer (as the engine does: layer ``l``'s statistics on that
copy's own stream), and the table gives, on held-out tokens, each Linear's output error
against the float model ``||X Wᵀ − X̃ Ŵᵀ|| / ||X Wᵀ||`` and the residual stream's error at each
layer's input, for the first token of each sequence (the attention sink, whose activations are
orders of magnitude larger) apart from the rest; then each copy's perplexity on the held-out
text (layers after ``--layers`` left float).

    QUANTKIT_CACHE=/work/qk-cache nice -n 10 .venv/bin/python benchmarks/gptaq_layers.py --layers 4

Variants: ``gptq`` (plain, on ``H̃``); ``ls`` (GPTQ on the least-squares target
``W + W (Cᵀ − H̃)(H̃ + λI)⁻¹``, the previous ``input_feedback``); ``gptaq a=..``
(``feedback_target`` with that ``alpha``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantkit.assets import builtin_model_dir  # noqa: E402
from quantkit.calibration import TextRequest, load_tokens  # noqa: E402
from quantkit.quantizers.gptq import GPTQParams, feedback_target, gptq_quantize  # noqa: E402

GROUPS = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.down_proj": ("mlp.down_proj",)}
RESIDUAL = "residual"


class _Stop(Exception):
    pass


def layer_inputs(model, layer: int, seqs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each input group's input in decoder layer ``layer`` and the layer's own input (residual
    stream), ``[sequences, length, width]`` in float64; the forward stops after the layer."""
    block = model.model.layers[layer]
    got: dict[str, list[torch.Tensor]] = {k: [] for k in (*GROUPS, RESIDUAL)}
    hooks = [block.get_submodule(k).register_forward_pre_hook(lambda _m, a, k=k: got[k].append(a[0].double()))
             for k in GROUPS]
    hooks.append(block.register_forward_pre_hook(
        lambda _m, a, kw: got[RESIDUAL].append((a[0] if a else kw["hidden_states"]).double()), with_kwargs=True))

    def stop(*_):
        raise _Stop

    hooks.append(block.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for s in seqs.split(8):
                try:
                    model(s)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def rel(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Relative error on the first token of each sequence and on the others."""
    first = torch.linalg.norm(ref[:, 0] - got[:, 0]) / torch.linalg.norm(ref[:, 0])
    rest = torch.linalg.norm(ref[:, 1:] - got[:, 1:]) / torch.linalg.norm(ref[:, 1:])
    return first.item(), rest.item()


def least_squares_target(w, h, cross, damp: float) -> torch.Tensor:
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return w + torch.linalg.solve(hd, (cross - h) @ w.T).T


def perplexity(model, seqs: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in seqs.split(8):
            logits = model(s).logits[:, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), s[:, 1:].flatten(), reduction="sum").item()
            count += s[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calib", default="32x256")
    ap.add_argument("--eval", default="16x256")
    ap.add_argument("--variants", default="gptq,ls,gptaq a=0.25")
    ap.add_argument("--source", default="shakespeare")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = builtin_model_dir("builtin:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    flt = load()
    variants = args.variants.split(",")
    copies = {v: load() for v in variants}
    nc, lc = (int(v) for v in args.calib.split("x"))
    ne, le = (int(v) for v in args.eval.split("x"))
    calib = torch.stack(load_tokens(TextRequest(args.source, nc, lc), tok)[:nc])
    held = torch.stack(load_tokens(TextRequest(f"{args.source}-eval", ne, le, section="evaluate"), tok)[:ne])
    params = GPTQParams(bits=4, group_size=64)
    scheme = params.finish(params.scheme())
    opts = dict(act_order=True, static_groups=True)

    def quantize(v: str, w, h, cross) -> torch.Tensor:
        if v == "gptq":
            target = w
        elif v == "ls":
            target = least_squares_target(w, h, cross, 0.01)
        else:
            target = feedback_target(w, h, cross, 0.01, alpha=float(v.split("=")[1]), act_order=True).double()
        return gptq_quantize(target.float(), h.float(), scheme, **opts).dequantize().double()

    print(f"calibration {args.source} {args.calib}, held-out {args.eval}; relative errors, first token / others")
    print("| layer | input of | " + " | ".join(variants) + " |")
    print("|---|---|" + "---:|" * len(variants))
    for li in range(args.layers):
        fc, fe = layer_inputs(flt, li, calib), layer_inputs(flt, li, held)
        ins = {v: (layer_inputs(m, li, calib), layer_inputs(m, li, held)) for v, m in copies.items()}
        cells = [f"{a:.4f} / {b:.4f}" for a, b in (rel(fe[RESIDUAL], ins[v][1][RESIDUAL]) for v in variants)]
        print(f"| {li} | layer (residual) | " + " | ".join(cells) + " |", flush=True)
        for key, names in GROUPS.items():
            for name in names:
                w = flt.model.layers[li].get_submodule(name).weight.detach().double()
                cells = []
                for v in variants:
                    xq, exq = ins[v][0][key].flatten(0, 1), ins[v][1][key]
                    x = fc[key].flatten(0, 1)
                    h, cross = (2.0 / xq.shape[0]) * xq.T @ xq, (2.0 / xq.shape[0]) * xq.T @ x
                    wq = quantize(v, w, h, cross)
                    cells.append("{:.4f} / {:.4f}".format(*rel(fe[key] @ w.T, exq @ wq.T)))
                    copies[v].model.layers[li].get_submodule(name).weight.data.copy_(wq.float())
                print(f"| {li} | {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nperplexity on held-out, layers 0..{args.layers - 1} quantized: float {perplexity(flt, held):.3f}, "
          + ", ".join(f"{v} {perplexity(m, held):.3f}" for v, m in copies.items()))


if __name__ == "__main__":
    main()
