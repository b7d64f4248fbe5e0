"""The export of one Mixtral-8x7B MoE layer's 24 expert Linears (W4A16 g128, compressed-tensors
pack-quantized), stage by stage, as ``export_layer`` does it beside the engine: each expert is
too large to share a ``STACK_BYTES`` stack, so each is packed on the device, copied to the host,
checked and written alone (``CheckpointWriter.add_quantized``).

    python benchmarks/export_layer.py          # on a CUDA machine; prints one table
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantkit.checkpoint import CheckpointWriter  # noqa: E402
from quantkit.finite_check import check_quantized, check_written  # noqa: E402
from quantkit.formats.base import FORMATS  # noqa: E402
from quantkit.host_copy import to_host  # noqa: E402
from quantkit.scheme import QuantizedWeight, Scheme, WeightScheme  # noqa: E402

import quantkit.formats.compressed_tensors  # noqa: E402,F401 (registers the format)

SCHEME = Scheme(WeightScheme(num_bits=4, type="int", strategy="group", group_size=128, symmetric=True))
SHAPES = [(14336, 4096)] * 16 + [(4096, 14336)] * 8  # w1, w3 and w2 of eight experts


def _linear(out_f: int, in_f: int) -> QuantizedWeight:
    codes = torch.randint(-8, 8, (out_f, in_f), dtype=torch.int8, device="cuda")
    scale = torch.rand(out_f, in_f // 128, device="cuda") * 0.01 + 0.001
    return QuantizedWeight(codes=codes, scale=scale, zero_point=None, scheme=SCHEME)


def _sync() -> None:
    torch.cuda.synchronize()


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    fmt = FORMATS["compressed-tensors"]()
    qws = [_linear(*s) for s in SHAPES]
    seconds = dict.fromkeys(["check scales (device)", "pack (device)", "copy to host", "check (host)",
                             "write", "add_quantized, whole"], 0.0)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        writer = CheckpointWriter(Path(tmp) / "out", Path(tmp) / "stage", fmt, torch.bfloat16, 5 << 30, False)
        writer.start()
        for rep in range(2):  # the first pass warms the pinned-memory cache and the page cache
            for k in seconds:
                seconds[k] = 0.0
            for e, qw in enumerate(qws):
                prefix = f"r{rep}.e{e}"
                t = time.perf_counter()
                check_quantized(prefix, qw)
                _sync()
                t1 = time.perf_counter()
                tensors = fmt.weight_tensors(prefix, qw, torch.bfloat16)
                _sync()
                t2 = time.perf_counter()
                host = {n: to_host(x).contiguous() for n, x in tensors.items()}
                t3 = time.perf_counter()
                for n, x in host.items():
                    check_written(n, x)
                t4 = time.perf_counter()
                for n, x in host.items():
                    writer._write(n + ".a", x)
                t5 = time.perf_counter()
                writer.add_quantized(prefix + ".b", qw)
                _sync()
                t6 = time.perf_counter()
                for k, v in zip(seconds, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                    seconds[k] += v
        packed = sum(x.numel() * x.element_size() for x in host.values()) * len(qws)
    print(f"| stage | seconds for a layer's 24 experts ({packed / 2**20:.0f} MiB written per pass) |")
    print("|---|---:|")
    for k, v in seconds.items():
        print(f"| {k} | {v:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
