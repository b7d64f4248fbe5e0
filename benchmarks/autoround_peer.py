"""AutoRound (the ``auto-round`` package) as a peer of ``benchmarks/quality.py``: W4A16 g64
symmetric by its signed-gradient rounding, on the calibration ids of a tokens file that
quality.py wrote, exported in llm-compressor's format (compressed-tensors pack-quantized), so
that the parity script's ``evaluate`` phase loads it with transformers like every other peer.

    python benchmarks/autoround_peer.py --model-dir DIR --tokens FILE --out-dir DIR [--iters 200]

Runs in AutoRound's python (no quantkit import); prints ``{"seconds": ..., "checkpoint": ...}``
as its last line: the quantize-and-save wall clock (model loading left out) and the folder
written (a subfolder of ``--out-dir``). Its defaults are kept (200 steps,
learning rate 1/steps, batch 8); only the scheme, the data and the export format are set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def quantize(model_dir: Path, tokens: Path, out_dir: Path, iters: int) -> tuple[float, Path]:
    import torch
    from auto_round import AutoRound
    from auto_round.schemes import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ids = load_file(str(tokens))["calibration"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    scheme = QuantizationScheme.from_dict({"bits": 4, "group_size": 64, "sym": True, "data_type": "int",
                                           "act_bits": 16})
    started = time.perf_counter()
    rounder = AutoRound(model, tok, scheme=scheme, dataset=list(ids.split(1)), iters=iters,
                        nsamples=len(ids), seqlen=ids.shape[1],
                        device_map="cuda" if torch.cuda.is_available() else "cpu")
    _, folders = rounder.quantize_and_save(str(out_dir), format="llm_compressor")
    seconds = time.perf_counter() - started
    # It saves into a subfolder named after the model and scheme; and for SmolLM2 (tied
    # embeddings: its shard writer's path) 0.15.1 wrote no config.json: the source's, with
    # the quantization_config it did write, stands in.
    folder = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)
    if not (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(model_dir)
        config.quantization_config = json.loads((folder / "quantization_config.json").read_text())
        config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return seconds, folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--tokens", type=Path, required=True, help="quality.py's tokens file (its 'calibration' ids)")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=200, help="AutoRound's steps per block (its default: 200)")
    args = ap.parse_args(argv)
    seconds, folder = quantize(args.model_dir, args.tokens, args.out_dir, args.iters)
    print(json.dumps({"seconds": seconds, "checkpoint": str(folder)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
