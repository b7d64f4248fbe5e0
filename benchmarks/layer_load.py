"""A decoder layer's load stage on its own: ``ModelRunner.load_layer`` over a few layers of a
random Qwen3-MoE model (one shard per layer, tensors named as the released checkpoints), its
wall and process CPU seconds and the number of shard opens, optionally from an FP8 source with
block scales (DeepSeek-V3's format) dequantized on read.

    .venv/bin/python benchmarks/layer_load.py                      # 128 experts at a small width
    .venv/bin/python benchmarks/layer_load.py --shape cpu-wide     # gpu_vs_llmcompressor's --cpu-wide shape
    .venv/bin/python benchmarks/layer_load.py --fp8                # the same, FP8 source

Per-tensor costs (header parsing, opens) show with many small experts; ``--device cuda`` on a
GPU machine adds the copies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Qwen3-30B-A3B's 128 experts per layer at a width a CPU reads in a moment.
_MANY_EXPERTS = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)


def to_fp8(src: Path, dst: Path, block: int = 64) -> Path:
    """``src`` with every 2-D layer weight stored as float8_e4m3fn codes and block scales."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "config.json").is_file():
        return dst
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        out = {}
        for name, t in load_file(str(shard)).items():
            if ".layers." in name and t.dim() == 2 and name.endswith(".weight") and "norm" not in name \
                    and t.shape[0] % block == 0 and t.shape[1] % block == 0:
                r, c = t.shape[0] // block, t.shape[1] // block
                s = (t.float().abs().reshape(r, block, c, block).amax((1, 3)) / 448).clamp_min(1e-12)
                out[name] = (t.float() / s.repeat_interleave(block, 0).repeat_interleave(block, 1)).to(
                    torch.float8_e4m3fn)
                out[name + "_scale_inv"] = s
            else:
                out[name] = t
        save_file(out, str(shard), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in dst.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            index["weight_map"].update({k: shard.name for k in f.keys()})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", choices=("many-experts", "cpu-wide", "qwen3-30b-a3b"), default="many-experts",
                    help="128 experts at a small width; gpu_vs_llmcompressor's --cpu-wide Qwen3-MoE; the real "
                    "Qwen3-30B-A3B layer (1.2 GB, for a GPU)")
    ap.add_argument("--fp8", action="store_true", help="the source in FP8 with 64x64 block scales")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="/tmp/quantkit-layer-load")
    args = ap.parse_args(argv)

    import safetensors
    import torch

    import gpu_vs_llmcompressor as bench
    from quantkit import model as model_module
    from quantkit.graph.runtime import ModelRunner
    from quantkit.model import ModelSource

    torch.set_num_threads(1)  # process CPU seconds of one thread: a shared machine's load moves wall time
    shape = bench.MOE_SHAPES["qwen3-30b-a3b"]
    shape["config"].update({"cpu-wide": bench._CPU_WIDE, "many-experts": _MANY_EXPERTS}.get(args.shape, {}))
    tag = args.shape
    folder = bench.build_moe_model("qwen3-30b-a3b", args.layers, Path(args.work) / f"{tag}-{args.layers}")
    if args.fp8:
        folder = to_fp8(folder, Path(args.work) / f"{tag}-{args.layers}-fp8")
    opens = [0]
    real_open = safetensors.safe_open

    def counting_open(*a, **k):
        opens[0] += 1
        return real_open(*a, **k)

    model_module.safe_open = counting_open
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runner = ModelRunner(ModelSource.open(str(folder)), device, torch.bfloat16)
    rows = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(runner.num_layers):
        opens[0] = 0
        t, c = time.perf_counter(), time.process_time()
        layer = runner.load_layer(i)
        sync()
        load_wall, load_cpu = time.perf_counter() - t, time.process_time() - c
        rows.append((i, sum(1 for _ in layer.parameters()), opens[0], load_wall, load_cpu))
        del layer
    total_wall, total_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(f"{tag}{' fp8' if args.fp8 else ''} on {args.device}")
    print(f"{'layer':>5} {'tensors':>8} {'opens':>6} {'load wall s':>12} {'load cpu s':>11}")
    for i, n, o, w, c in rows:
        print(f"{i:>5} {n:>8} {o:>6} {w:>12.3f} {c:>11.3f}")
    print(f"total wall {total_wall:.3f} s, process cpu {total_cpu:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
