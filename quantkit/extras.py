"""Optional dependencies: one line that names the extra to install when one is missing."""

from __future__ import annotations

import importlib.util

from .errors import MissingDependencyError


def require(module: str, package: str, extra: str, needed_by: str) -> None:
    """Raise ``MissingDependencyError`` naming ``quantkit[extra]`` when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{package} is not installed ({needed_by} needs it)",
                                     hint=f"pip install 'quantkit[{extra}]'", value=package)
