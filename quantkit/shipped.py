"""Data shipped inside the package: recipes, calibration set definitions and the text the
project wrote. Read through ``importlib.resources``, so an installed wheel finds them as a
checkout does; nothing is looked up relative to the source tree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def _data(folder: str) -> Traversable:
    return resources.files("quantkit").joinpath("data", folder)


def _named(folder: str, name: str) -> Traversable | None:
    """``folder/<name>.yaml`` if ``name`` is a bare name (not a path) that the package ships."""
    stem = name.removesuffix(".yaml")
    if not stem or any(c in stem for c in "/\\") or stem.startswith((".", "~")):
        return None
    found = _data(folder).joinpath(f"{stem}.yaml")
    return found if found.is_file() else None


def _names(folder: str) -> list[str]:
    return sorted(t.name.removesuffix(".yaml") for t in _data(folder).iterdir() if t.name.endswith(".yaml"))


def recipe(name: str) -> Traversable | None:
    """The shipped recipe called ``name`` (``smollm2-gptq`` or ``smollm2-gptq.yaml``), if any."""
    return _named("recipes", name)


def recipe_names() -> list[str]:
    return _names("recipes")


def calibration_definition(name: str) -> Traversable | None:
    """The shipped calibration set definition called ``name`` (``shakespeare``), if any."""
    return _named("calibration", name)


def calibration_names() -> list[str]:
    return _names("calibration")


@contextlib.contextmanager
def calibration_file(name: str) -> Iterator[Path]:
    """A shipped calibration data file as a real path, for readers that need one (datasets)."""
    with resources.as_file(_data("calibration").joinpath(name)) as path:
        yield path


def calibration_bytes(name: str) -> bytes:
    return _data("calibration").joinpath(name).read_bytes()
