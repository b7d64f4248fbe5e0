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
    """Run a recipe (a YAML path, a Recipe, or the recipe's sections as keyword arguments).

    ``model`` may be given as a plain string (the id); every other section is a dict with
    the same keys as the YAML. Returns the report also written to ``report.json``.
    """
    from . import pipeline
    from .recipe import RecipeBase, load_recipe, make_recipe

    if recipe is None:
        if isinstance(options.get("model"), str):
            options["model"] = {"id": options["model"]}
        recipe = make_recipe(options, where="quantize()")
    elif isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif not isinstance(recipe, RecipeBase):
        raise TypeError("recipe must be a path, a Recipe, or None with keyword arguments")
    return pipeline.run(recipe, quiet=quiet, resume=resume)


def load_recipe(path: "str | Path"):
    from .recipe import load_recipe as _load

    return _load(path)


__all__ = ["quantize", "load_recipe", "__version__"]
