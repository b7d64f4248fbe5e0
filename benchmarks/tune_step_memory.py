"""One ``quantkit tune`` step's GPU memory and time by decoder-layer count at Llama-3.1-8B shapes,
with the student's attention as tune runs it (``tune_attention``: bf16 sdpa in training) and as
it ran before stop 45 (float32 sdpa, which PyTorch's math kernel served with grouped key/value
heads, keeping each head's [T, T] weights):

    python benchmarks/tune_step_memory.py [--layers 4,8] [--tokens 2048]

A random-weight student (``GroupScaledLinear`` with random 4-bit codes, bf16 products, float32
stream) and a random bf16 target; one window a step. Per layer count and attention: the memory
the forward leaves for the backward (all of it, and per layer in float32 vectors of hidden +
intermediate size a token, the head's share included), the step's peak, and the fastest of three
timed forward+backward steps after one untimed. Prints one table.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.group_scaled import GroupScaledLinear  # noqa: E402
from quantkit.scale_tuning import next_token_kl, tensor_core_matmuls  # noqa: E402
from quantkit.tune_attention import use_training_attention  # noqa: E402

GIB = 1024**3
HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128256


def student(layers: int, device: torch.device, bf16_attention: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=VOCAB, num_hidden_layers=layers,
                         attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in name:
            steps = torch.randint(-7, 8, mod.weight.shape, dtype=torch.int8, device=device)
            scale = torch.rand(mod.weight.shape[0], mod.weight.shape[1] // 128, device=device) * 0.01 + 0.001
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, GroupScaledLinear(steps, scale, None, torch.bfloat16))
    if bf16_attention:
        use_training_attention(model, torch.bfloat16)
    model = model.float()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.requires_grad_(True)
    return model.train()


def measure(layers: int, tokens: int, bf16_attention: bool, device: torch.device) -> dict:
    model = student(layers, device, bf16_attention)
    ids = torch.randint(0, VOCAB, (1, tokens), device=device)
    target = torch.randn(1, tokens - 1, VOCAB, device=device, dtype=torch.bfloat16)
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated()
    times, left, peak = [], 0, 0
    with tensor_core_matmuls(device):
        for _ in range(4):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            began = time.perf_counter()
            loss = next_token_kl(model(ids).logits[:, :-1], target).mean()
            torch.cuda.synchronize()
            left = torch.cuda.memory_allocated() - held
            loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
            peak = torch.cuda.max_memory_allocated() - held
            del loss
    row = {"layers": layers, "attention": model.config._attn_implementation, "left": left / GIB,
           "vectors": left / layers / (tokens * 4 * (HIDDEN + INTERMEDIATE)), "peak": peak / GIB,
           "step": min(times[1:])}
    del model, target
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,8")
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    device = torch.device("cuda")
    rows = [measure(n, args.tokens, bf16, device) for n in (int(x) for x in args.layers.split(","))
            for bf16 in (False, True)]
    print(f"One tune step at Llama-3.1-8B shapes on {torch.cuda.get_device_name()}, {args.tokens} tokens, bf16 "
          "products")
    print("| layers | attention | left for the backward GiB | per layer, vectors | step peak GiB | forward+backward s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['attention']} | {r['left']:.2f} | {r['vectors']:.2f} | {r['peak']:.2f} | "
              f"{r['step']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
