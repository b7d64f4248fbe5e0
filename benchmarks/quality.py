"""quantkit's 4-bit (and 8-bit) recipes on real text the project never tuned on, over several
calibration draws, with 95% intervals: which recipe is closest to bf16, at what time.

    QUANTKIT_CACHE=/work/qk-cache nice -n 10 python benchmarks/quality.py \
        --rows rtn,gptq-plain,gptq,gptq-rot --seeds 0,1,2 --domains pydoc [--calib 32x256] [--eval 16x256]
    python benchmarks/quality.py --table            # the table from every run saved so far

Domains (calibration and evaluation always from different documents):
- ``pydoc``: the Python language reference as Debian ships it
  (``/usr/lib/python3.11/pydoc_data/topics.py``, package libpython3.11-stdlib; the running
  interpreter's copy where Debian's is absent): technical English with code. Topics in sorted
  order alternate between calibration (even) and evaluation (odd).
- ``shakespeare``: the shipped ``shakespeare`` (comedies and histories) / ``shakespeare-eval``
  (tragedies) sets.

Each run is one ``pipeline.run`` of ``builtin:smollm2-135m`` (SmolLM2-135M-Instruct); its
base and quantized perplexity come from the engine's one streaming pass over the same
evaluation windows, so the difference is paired. A calibration draw is ``calibration.seed``
(which passages are packed). Each run's result is a JSON file under ``--out``, so several
processes (different ``--rows``) can share the work and ``--table`` joins them. The interval
is the mean over draws ± t(0.975, n−1)·s/√n of the relative perplexity increase. Time is the
engine's quantize phase summed over layers (loading, evaluation and export left out).

Peers (``--peers llmc-gptq,llmc-awq,autoround``) run through ``llmcompressor_parity.py``'s
reference phases and ``autoround_peer.py`` on the same calibration and evaluation ids (written to
``--out/tokens``); their checkpoint and the base model are both scored by transformers with one
function, and the increase is against that base. Their time is their quantize-and-save alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "builtin:smollm2-135m"
_W4 = {"bits": 4, "group_size": 64}
_ACT = {"act_order": True, "static_groups": True}
# The best row's settings (the shipped 4-bit recipes' before ``sequential``), which its variants extend.
_BEST = {"method": "gptq", **_W4, **_ACT, "symmetric": False, "clip_search": True, "input_feedback": True,
         "rotate": "hadamard"}

# key: (label, quantization section, export format or None for the method's default)
ROWS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "rtn": ("RTN W4A16 g64 sym", {"method": "rtn", **_W4}, None),
    "rtn-rot": ("RTN W4A16 g64 sym + Hadamard", {"method": "rtn", **_W4, "rotate": "hadamard"}, None),
    "gptq-plain": ("GPTQ W4A16 g64 sym, no act-order (the old library default)",
                   {"method": "gptq", **_W4, "act_order": False}, None),
    "gptq": ("GPTQ W4A16 g64 sym, act-order static", {"method": "gptq", **_W4, **_ACT}, None),
    "gptq-asym": ("GPTQ W4A16 g64 asym, act-order static",
                  {"method": "gptq", **_W4, **_ACT, "symmetric": False}, None),
    "gptq-rot": ("GPTQ W4A16 g64 sym, act-order static + Hadamard",
                 {"method": "gptq", **_W4, **_ACT, "rotate": "hadamard"}, None),
    "gptq-asym-rot": ("GPTQ W4A16 g64 asym, act-order static + Hadamard",
                      {"method": "gptq", **_W4, **_ACT, "symmetric": False, "rotate": "hadamard"}, None),
    "gptq-clip": ("GPTQ W4A16 g64 sym, act-order static, clip search",
                  {"method": "gptq", **_W4, **_ACT, "clip_search": True}, None),
    "gptq-asym-clip": ("GPTQ W4A16 g64 asym, act-order static, clip search",
                       {"method": "gptq", **_W4, **_ACT, "symmetric": False, "clip_search": True}, None),
    "gptq-rot-clip": ("GPTQ W4A16 g64 sym, act-order static, clip search + Hadamard",
                      {"method": "gptq", **_W4, **_ACT, "clip_search": True, "rotate": "hadamard"}, None),
    "gptq-asym-rot-clip": ("GPTQ W4A16 g64 asym, act-order static, clip search + Hadamard",
                           {"method": "gptq", **_W4, **_ACT, "symmetric": False, "clip_search": True,
                            "rotate": "hadamard"}, None),
    "gptq-fb": ("GPTQ W4A16 g64 sym, act-order static, input feedback",
                {"method": "gptq", **_W4, **_ACT, "input_feedback": True}, None),
    "gptq-asym-rot-fb": ("GPTQ W4A16 g64 asym, act-order static, input feedback + Hadamard",
                         {"method": "gptq", **_W4, **_ACT, "symmetric": False, "input_feedback": True,
                          "rotate": "hadamard"}, None),
    "gptq-asym-rot-clip-fb": ("GPTQ W4A16 g64 asym, act-order static, clip search, input feedback + Hadamard",
                              _BEST, None),
    "gptq-asym-rot-clip-fb-damp0.1": ("GPTQ W4A16 g64 asym, act-order static, clip search, input feedback + Hadamard, "
                                      "damping 0.1",
                                      {**_BEST, "dampening_frac": 0.1}, None),
    "gptq-asym-rot-clip-fb-damp0.001": ("GPTQ W4A16 g64 asym, act-order static, clip search, input feedback + "
                                        "Hadamard, damping 0.001",
                                        {**_BEST, "dampening_frac": 0.001}, None),
    "rtn-online": ("RTN W4A16 g64 sym + online down_proj Hadamard",
                   {"method": "rtn", **_W4, "online_down_proj": True}, None),
    "gptq-online": ("GPTQ W4A16 g64 sym, act-order static + online down_proj Hadamard",
                    {"method": "gptq", **_W4, **_ACT, "online_down_proj": True}, None),
    "gptq-asym-rot-online": ("GPTQ W4A16 g64 asym, act-order static + Hadamard + online down_proj Hadamard",
                             {"method": "gptq", **_W4, **_ACT, "symmetric": False, "rotate": "hadamard",
                              "online_down_proj": True}, None),
    "gptq-asym-rot-clip-fb-online": ("GPTQ W4A16 g64 asym, act-order static, clip search, input feedback + Hadamard "
                                     "+ online down_proj Hadamard",
                                     {**_BEST, "online_down_proj": True}, None),
    "gptq-asym-rot-clip-seq": ("GPTQ W4A16 g64 asym, act-order static, clip search, sequential + Hadamard",
                               {"method": "gptq", **_W4, **_ACT, "symmetric": False, "clip_search": True,
                                "sequential": True, "rotate": "hadamard"}, None),
    "gptq-asym-rot-clip-fb-seq": ("GPTQ W4A16 g64 asym, act-order static, clip search, input feedback, sequential "
                                  "+ Hadamard",
                                  {**_BEST, "sequential": True}, None),
    "awq": ("AWQ W4A16 g64 asym (grid 20)", {"method": "awq", **_W4, "symmetric": False}, "awq"),
    "awq-rot": ("AWQ W4A16 g64 asym (grid 20) + Hadamard",
                {"method": "awq", **_W4, "symmetric": False, "rotate": "hadamard"}, None),
    "w8a8": ("W8A8 int8 dynamic, GPTQ weights", {"method": "dynamic_int8", "weight_method": "gptq"}, None),
    "w8a8-rot": ("W8A8 int8 dynamic, GPTQ weights + Hadamard",
                 {"method": "dynamic_int8", "weight_method": "gptq", "rotate": "hadamard"}, None),
    "fp8": ("FP8 dynamic, per-channel weights", {"method": "fp8"}, None),
    "fp8-rot": ("FP8 dynamic, per-channel weights + Hadamard", {"method": "fp8", "rotate": "hadamard"}, None),
}

# Peers, run in --peer-python (where llm-compressor and auto-round are installed) on the same
# calibration and evaluation ids: llm-compressor by benchmarks/llmcompressor_parity.py's
# reference phases (GPTQ W4A16 g64 sym with static act-order, damping 0.01, block 128; AWQ W4A16
# g64 asym, grid 20), AutoRound by benchmarks/autoround_peer.py (W4A16 g64 sym, its defaults).
# key: (label, script and its arguments before --model-dir/--tokens/--out-dir)
PEERS = {"llmc-gptq": ("llm-compressor GPTQ W4A16 g64 sym, act-order static",
                       ("llmcompressor_parity.py", "--phase", "llmc-quantize", "--method", "gptq")),
         "llmc-awq": ("llm-compressor AWQ W4A16 g64 asym (grid 20)",
                      ("llmcompressor_parity.py", "--phase", "llmc-quantize", "--method", "awq")),
         "autoround": ("AutoRound W4A16 g64 sym ({iters} steps)", ("autoround_peer.py",))}

DETERMINISTIC = ("rtn", "fp8")  # methods whose default settings read no calibration data

# t(0.975, df) for the 95% interval of a mean over a few draws
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _pair(text: str) -> tuple[int, int]:
    n, length = text.lower().split("x")
    return int(n), int(length)


def pydoc_files(work: Path) -> tuple[Path, Path]:
    """Calibration and evaluation .jsonl files from the Python reference's topics."""
    import importlib.util

    debian = Path("/usr/lib/python3.11/pydoc_data/topics.py")
    if debian.is_file():
        spec = importlib.util.spec_from_file_location("debian_pydoc_topics", debian)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        topics = module.topics
    else:
        from pydoc_data.topics import topics
    work.mkdir(parents=True, exist_ok=True)
    paths = work / "pydoc-calib.jsonl", work / "pydoc-eval.jsonl"
    for part, path in enumerate(paths):
        text = "".join(json.dumps({"text": topics[name]}) + "\n" for i, name in enumerate(sorted(topics))
                       if i % 2 == part)
        if not path.is_file() or path.read_text() != text:  # processes sharing --out never see a partial file
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return paths


def sources(domain: str, work: Path) -> tuple[str, str]:
    if domain == "shakespeare":
        return "shakespeare", "shakespeare-eval"
    calib, evaluation = pydoc_files(work)
    return str(calib), str(evaluation)


def run_one(key: str, domain: str, seed: int, calib: tuple[int, int], evaluation: tuple[int, int],
            work: Path, device: str, model: str) -> dict[str, Any]:
    from quantkit import pipeline
    from quantkit.recipe import make_recipe

    label, quant, fmt = ROWS[key]
    cal_src, eval_src = sources(domain, work)
    out = work / "checkpoints" / f"{domain}-{key}-{seed}"
    recipe = make_recipe({
        "model": {"id": model},
        "quantization": quant,
        "calibration": {"source": cal_src, "num_samples": calib[0], "max_seq_length": calib[1], "seed": seed},
        "evaluate": {"source": eval_src, "num_samples": evaluation[0], "max_seq_length": evaluation[1]},
        "export": {"output_dir": str(out), "overwrite": True, **({"format": fmt} if fmt else {})},
        "device": device,
    })
    began = time.perf_counter()
    report = pipeline.run(recipe, quiet=True)
    ev = report["evaluation"]
    return {"key": key, "label": label, "domain": domain, "seed": seed, "calib": list(calib),
            "eval": list(evaluation), "ppl_base": ev["perplexity_base"], "ppl": ev["perplexity_quantized"],
            "device": device, "quantize_s": report["timing"]["phase_seconds"].get("quantize", 0.0),
            "total_s": time.perf_counter() - began}


def dump_tokens(domain: str, seed: int, calib: tuple[int, int], evaluation: tuple[int, int], work: Path,
                model_dir: Path) -> Path:
    """The exact ids ``run_one``'s pipeline loads, as the parity script's tokens file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from quantkit.calibration import TextRequest, load_tokens

    cal_src, eval_src = sources(domain, work)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cal = load_tokens(TextRequest(cal_src, calib[0], calib[1], True, seed, True), tok, model_dir)
    ev = load_tokens(TextRequest(eval_src, evaluation[0], evaluation[1], True, 0, False, section="evaluate"),
                     tok, model_dir)
    path = work / "tokens" / f"{domain}-{seed}-{calib[0]}x{calib[1]}-{evaluation[0]}x{evaluation[1]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"calibration": torch.stack(cal), "evaluation": torch.stack(ev)}, str(path))
    return path


class PeerFailed(RuntimeError):
    """A peer's subprocess failed: that run is skipped, the table goes on (its stderr is printed)."""


def run_peer(key: str, domain: str, seed: int, calib: tuple[int, int], evaluation: tuple[int, int],
             work: Path, model: str, python: str, autoround_iters: int) -> dict[str, Any]:
    """One peer run and the perplexity of its checkpoint and of the base model, both loaded by
    transformers and scored by the same function (the parity script's)."""
    import subprocess

    from quantkit.model import ModelSource

    label, (script, *quantize_args) = PEERS[key]
    if key == "autoround":
        label = label.format(iters=autoround_iters)
        quantize_args = ["--iters", str(autoround_iters)]
    model_dir = ModelSource.open(model).path
    tokens = dump_tokens(domain, seed, calib, evaluation, work, model_dir)
    out = work / "checkpoints" / f"{domain}-{key}-{seed}"

    def phase(script: str, *argv: str) -> dict:
        env = dict(os.environ)
        if "PEER_PYTHONPATH" in env:  # a separate venv (scripts/llmcompressor_venv.sh) wants its own path
            env["PYTHONPATH"] = env["PEER_PYTHONPATH"]
        proc = subprocess.run([python, str(ROOT / "benchmarks" / script), *argv], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-6000:])
            raise PeerFailed(f"peer step {script} {argv[:2]} failed (exit {proc.returncode}); its stderr is above")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    done = phase(script, *quantize_args, "--model-dir", str(model_dir), "--tokens", str(tokens),
                 "--out-dir", str(out))
    checkpoint = done.get("checkpoint", str(out))  # AutoRound writes into a subfolder
    ppl = phase("llmcompressor_parity.py", "--phase", "evaluate", "--tokens", str(tokens), "--checkpoints",
                str(model_dir), checkpoint)
    return {"key": key, "label": label, "domain": domain, "seed": seed, "calib": list(calib),
            "eval": list(evaluation), "ppl_base": ppl[str(model_dir)], "ppl": ppl[checkpoint],
            "quantize_s": done["seconds"], "peer": True}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (0 for one draw: no interval)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, _T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for domain, cal, ev in sorted({(r["domain"], tuple(r["calib"]), tuple(r["eval"])) for r in results}):
        rows = [r for r in results if (r["domain"], tuple(r["calib"]), tuple(r["eval"])) == (domain, cal, ev)]
        # Every row against the original model's perplexity: a rotated recipe's own base (its
        # rotated float model in the compute dtype) is up to 0.3% higher in bf16, and measuring
        # it against that would hide the rotation's rounding from the comparison.
        original = [r for r in rows if not ROWS.get(r["key"], ("", {}))[1].get("rotate")] or rows
        base = statistics.fmean(r["ppl_base"] for r in original)
        lines += [f"\n### {domain} (calibration {cal[0]}x{cal[1]}, evaluation {ev[0]}x{ev[1]}; "
                  f"bf16 base perplexity {base:.3f})", "",
                  "| recipe | draws | ppl (mean) | Δ ppl vs bf16 (mean ± 95%) | quantize s (mean) |",
                  "|---|---:|---:|---:|---:|"]
        by_key: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_key.setdefault(r["key"], []).append(r)
        ordered = sorted(by_key.items(), key=lambda kv: statistics.fmean(x["ppl"] for x in kv[1]))
        for key, rs in ordered:
            rel, half = interval([100 * (r["ppl"] / base - 1) for r in rs])
            ci = "" if math.isnan(half) else f" ± {half:.2f}"
            lines.append(f"| {rs[0]['label']} | {len(rs)} | {statistics.fmean(r['ppl'] for r in rs):.3f} | "
                         f"{rel:+.2f}%{ci} | {statistics.fmean(r['quantize_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="rtn,gptq-plain,gptq,gptq-rot",
                    help=f"comma-separated, run in this order, of {', '.join(ROWS)}; peers may be listed here too")
    ap.add_argument("--domains", default="pydoc,shakespeare")
    ap.add_argument("--seeds", default="0,1,2", help="calibration draws")
    ap.add_argument("--calib", default="32x256", help="calibration samples x tokens")
    ap.add_argument("--eval", default="16x256", help="evaluation windows x tokens")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "quantkit-quality")
    ap.add_argument("--model", default=MODEL, help="the model (a local folder where the builtin is not installed)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 compute there: runs are not comparable "
                    "across devices, and results are kept apart)")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no new run after this many seconds (call again to resume where it stopped)")
    ap.add_argument("--peers", default="", help=f"comma-separated, of {', '.join(PEERS)} (needs llm-compressor "
                    "in --peer-python)")
    ap.add_argument("--peer-python", default=sys.executable, help="python where llm-compressor and auto-round "
                    "are installed (its PYTHONPATH from $PEER_PYTHONPATH)")
    ap.add_argument("--autoround-iters", type=int, default=200, help="AutoRound's steps per block (its default; "
                    "fewer only to check the peer path on a CPU)")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs saved under --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results_dir = args.out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.table:
        calib, evaluation = _pair(args.calib), _pair(args.eval)
        keys = [k for k in args.rows.split(",") if k] + [k for k in args.peers.split(",") if k]
        unknown = [k for k in keys if k not in ROWS and k not in PEERS]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; choose from {', '.join([*ROWS, *PEERS])}")
        seeds = [int(s) for s in args.seeds.split(",")]
        started = time.perf_counter()
        plan = [(domain, seed, key) for domain in args.domains.split(",") for n, seed in enumerate(seeds)
                for key in keys  # every row's first draw before any row's second
                if not (n and key in ROWS and ROWS[key][1]["method"] in DETERMINISTIC)]  # no calibration: one run is every draw
        for domain, seed, key in plan:
            path = results_dir / f"{domain}-{key}-{seed}-{args.calib}-{args.eval}-{args.device}.json"
            if path.is_file():
                continue
            if time.perf_counter() - started > args.budget_s:
                print("time budget spent: run the same command again to continue", flush=True)
                break
            if key in PEERS:
                try:
                    row = run_peer(key, domain, seed, calib, evaluation, args.out, args.model, args.peer_python,
                                   args.autoround_iters)
                except PeerFailed as e:
                    print(f"{domain} {key} seed {seed}: {e}: skipped", flush=True)
                    continue
            else:
                row = run_one(key, domain, seed, calib, evaluation, args.out, args.device, args.model)
            path.write_text(json.dumps(row))
            print(f"{domain} {key} seed {seed}: ppl {row['ppl']:.3f} (base {row['ppl_base']:.3f}), "
                  f"quantize {row['quantize_s']:.0f} s", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob(f"*-{args.device}.json"))]
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
