"""quantkit: quantize Hugging Face causal LMs layer by layer into checkpoints vLLM serves.

    import quantkit
    report = quantkit.quantize(model="HuggingFaceTB/SmolLM2-135M-Instruct",
                               quantization={"method": "gptq", "bits": 4, "group_size": 64},
                               export={"output_dir": "out/smollm2-w4a16"})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def quantize(recipe: "str | Path | Any | None" = None, *, quiet: bool = False, resume: bool = False,
             **options: Any) -> dict[str, Any]:
    """Run a recipe (a YAML path, a shipped recipe's name, a Recipe, or the recipe's sections
    as keyword arguments).

    ``model`` may be given as a plain string (the id); every other section is a dict with
    the same keys as the YAML. Returns the report also written to ``report.json``.
    """
    from . import pipeline

    recipe_file = Path(recipe).expanduser() if isinstance(recipe, (str, Path)) else None
    return pipeline.run(_recipe(recipe, options, "quantize()"), quiet=quiet, resume=resume,
                        recipe_file=recipe_file)


def validate(recipe: "str | Path | Any | None" = None, **options: Any):
    """Everything ``quantize`` checks before it reads a weight, against the model and this
    machine; returns the typed ``RunPlan`` (model shape, groups checked, sizes, disk need) or
    raises the first problem as a ``QuantkitError``. Takes what ``quantize`` takes."""
    from .preflight import check

    return check(_recipe(recipe, options, "validate()"))


def _recipe(recipe: Any, options: dict[str, Any], where: str):
    from .recipe import RecipeBase, load_recipe, make_recipe

    if recipe is None:
        if isinstance(options.get("model"), str):
            options["model"] = {"id": options["model"]}
        return make_recipe(options, where=where)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    if not isinstance(recipe, RecipeBase):
        raise TypeError("recipe must be a path, a Recipe, or None with keyword arguments")
    return recipe


def load_recipe(path: "str | Path"):
    """Read and validate a recipe YAML (nothing is loaded or downloaded)."""
    from .recipe import load_recipe as _load

    return _load(path)


def plan(model: str, **options: Any):
    """Memory plan and ``vllm serve`` line for ``model`` (reads only config.json).

    ``quantkit.plan("meta-llama/Llama-3.1-70B-Instruct", gpu="A100-80GB")``; options are
    those of :func:`quantkit.planner.plan_model`. Returns a typed ``PlanResult``.
    """
    from .planner import plan_model

    return plan_model(model, **options)


def push(folder: "str | Path", repo_id: str, **options: Any):
    """Upload a finished output folder to the Hub and verify it (see :func:`quantkit.hub.push_folder`)."""
    from .hub import push_folder

    return push_folder(folder, repo_id, **options)


def tune(folder: "str | Path", **options: Any) -> dict[str, Any]:
    """Tune a finished output folder's weight-only (W4A16, W8A16) group scales and norm weights end to end against
    its base model, in place (see :func:`quantkit.folder_tuning.tune_folder` for the options);
    returns the ``tuning`` section also written to report.json."""
    from .folder_tuning import tune_folder

    return tune_folder(folder, **options)


__all__ = ["quantize", "validate", "load_recipe", "plan", "push", "tune", "__version__"]
