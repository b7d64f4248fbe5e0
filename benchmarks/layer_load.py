"""A decoder layer's load stage on its own: ``ModelRunner.load_layer`` over a few layers of a
random Qwen3-MoE model (one shard per layer, tensors named as the released checkpoints), read
one tensor at a time through safetensors and in bulk (``quantkit.bulk_read``: threads
``preadv`` into a few reused chunks, page-locked on a GPU, copied asynchronously), side by
side: wall and process CPU seconds a layer, the same for the tensors outside the layers (the
finite check of embedding and head, then the embedding read), and whether both paths gave the
same bytes. Optionally from an FP8 source with block scales (DeepSeek-V3's format) dequantized
on read. The shards are read once before timing, so both paths read from the page cache.

    .venv/bin/python benchmarks/layer_load.py                      # 128 experts at a small width
    .venv/bin/python benchmarks/layer_load.py --shape cpu-wide     # gpu_vs_llmcompressor's --cpu-wide shape
    .venv/bin/python benchmarks/layer_load.py --fp8                # the same, FP8 source
    .venv/bin/python benchmarks/layer_load.py --shape qwen3-30b-a3b --layers 2 --device cuda   # the real layer

On the CPU the run's path stays one tensor at a time (``ShardReader.BULK_DEVICES``); the bulk
column there says what it would cost.
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
                    "Qwen3-30B-A3B layer (1.2 GB)")
    ap.add_argument("--fp8", action="store_true", help="the source in FP8 with 64x64 block scales")
    ap.add_argument("--model", help="an existing model folder instead of building one (e.g. build_moe_model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each path, alternating; the best is shown")
    ap.add_argument("--work", default="/tmp/quantkit-layer-load")
    args = ap.parse_args(argv)

    import torch

    import gpu_vs_llmcompressor as bench
    from quantkit.finite_check import check_source_tensors
    from quantkit.graph.runtime import ModelRunner
    from quantkit.model import ModelSource, ShardReader

    torch.set_num_threads(1)  # process CPU seconds of one thread: a shared machine's load moves wall time
    tag = args.shape
    if args.model:
        folder, tag = Path(args.model), Path(args.model).name
    else:
        shape = bench.MOE_SHAPES["qwen3-30b-a3b"]
        shape["config"].update({"cpu-wide": bench._CPU_WIDE, "many-experts": _MANY_EXPERTS}.get(args.shape, {}))
        folder = bench.build_moe_model("qwen3-30b-a3b", args.layers, Path(args.work) / f"{tag}-{args.layers}")
    if args.fp8:
        folder = to_fp8(folder, Path(args.work) / f"{folder.name}-fp8")
    for shard in sorted(folder.glob("*.safetensors")):  # into the page cache
        with open(shard, "rb") as f:
            while f.read(64 << 20):
                pass
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.ones(1).to(device)  # the CUDA context, before the first path's clock
    sync()
    source = ModelSource.open(str(folder))
    runner = ModelRunner(source, device, torch.bfloat16)
    times: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    tensors: dict[str, int] = {}
    first: dict[str, dict[str, torch.Tensor]] = {}
    paths = (("one at a time", ()), ("bulk", (device.type,)))

    def clock(path: str, what: str, run) -> None:
        t, c = time.perf_counter(), time.process_time()
        n = run()
        sync()
        times.setdefault((path, what), []).append((time.perf_counter() - t, time.process_time() - c, _rss_gib()))
        tensors[what] = n

    def load(i: int, path: str) -> int:
        layer = runner.load_layer(i)
        if i == 0:
            first.setdefault(path, {k: v.reshape(-1).view(torch.uint8) for k, v in layer.state_dict().items()})
        return sum(1 for _ in layer.parameters())

    def read(i: int) -> int:
        with runner.source.reader() as r:
            return len(r.to_device_all(list(runner.layer_sources(i).values()), device, torch.bfloat16))

    outside = runner.outside_text_sources()
    embed = next(n for n, m in runner.model.named_modules() if m is runner.model.get_input_embeddings())

    def check_outside() -> int:
        check_source_tensors(source, outside, device)
        runner.read_source(f"{embed}.weight", torch.empty(0))
        return len(outside)

    for _ in range(args.repeat):  # the paths alternate; the best of each is shown (a shared machine's noise)
        for path, bulk in paths:
            ShardReader.BULK_DEVICES = bulk
            clock(path, "outside", check_outside)
            for i in range(runner.num_layers):
                clock(path, f"layer {i}", lambda i=i, path=path: load(i, path))
                clock(path, f"read {i}", lambda i=i: read(i))
    a, b = first.values()
    same = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{tag}{' fp8' if args.fp8 else ''} on {args.device}, best of {args.repeat}: layer 0 the same bytes "
          f"both ways: {same}")
    print("'outside': finite check of embedding and head, then the embedding read; 'layer i': load_layer; "
          "'read i': its tensors read alone")
    whats = list(tensors)
    print(f"{'':>10} {'tensors':>8} | {'one at a time: wall s':>22} {'cpu s':>7} {'RSS GiB':>8} | "
          f"{'bulk: wall s':>13} {'cpu s':>7} {'RSS GiB':>8} | {'bulk/one':>8}")
    total = {p: 0.0 for p, _ in paths}
    for what in whats:
        cells = []
        for p, _ in paths:
            w = min(x[0] for x in times[(p, what)])
            c = min(x[1] for x in times[(p, what)])
            rss = max(x[2] for x in times[(p, what)])
            total[p] += w if what.startswith("layer") else 0.0
            cells.append((w, c, rss))
        (w1, c1, r1), (w2, c2, r2) = cells
        print(f"{what:>10} {tensors[what]:>8} | {w1:>22.3f} {c1:>7.3f} {r1:>8.2f} | {w2:>13.3f} {c2:>7.3f} "
              f"{r2:>8.2f} | {w2 / max(w1, 1e-9):>7.2f}x")
    print(f"layers (load_layer): one at a time {total['one at a time']:.3f} s, bulk {total['bulk']:.3f} s "
          f"({total['bulk'] / max(total['one at a time'], 1e-9):.2f}x)")
    return 0 if same else 1


def _rss_gib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


if __name__ == "__main__":
    sys.exit(main())
