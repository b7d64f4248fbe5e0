"""Exceptions users see. Each names the field, file or module at fault and what to do.

The CLI prints ``QuantkitError`` subclasses as one line and exits non-zero; anything else
is a bug and keeps its traceback. Besides the line, an error carries its parts as data
(``field``, ``value``, ``hint``, ``file``): tests and programs that call quantkit assert on
those instead of matching substrings of the wording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class QuantkitError(Exception):
    """Base class of every error quantkit reports to a user.

    ``message`` says what is wrong; ``field`` is the recipe field's dotted path (or the CLI
    option) at fault, ``value`` the offending value, ``file`` the file or tensor at fault, and
    ``hint`` what to do. ``str()`` is the one line the CLI prints: the message, then the hint.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None,
                 hint: str | None = None, file: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.hint = hint
        self.file = None if file is None else str(file)

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}; {self.hint}"

    def to_dict(self) -> dict[str, Any]:
        """The error as plain data (``quantkit validate --json``, reports)."""
        value = self.value if isinstance(self.value, (str, int, float, bool, type(None))) else repr(self.value)
        return {"error": type(self).__name__, "message": self.message, "field": self.field,
                "value": value, "file": self.file, "hint": self.hint}


class RecipeError(QuantkitError):
    """The recipe (YAML or keyword arguments) is invalid; raised before any weight is read."""


class ModelError(QuantkitError):
    """The model folder or hub id cannot be used (missing, unsupported, unsafe format)."""


class CalibrationError(QuantkitError):
    """The calibration data cannot be loaded or does not fit the request."""


class NumericsError(QuantkitError):
    """NaN/Inf in weights or activations, or a factorisation that cannot be rescued."""


class ExportError(QuantkitError):
    """The output cannot be written (existing folder, disk space, incompatible scheme)."""


class DeviceMemoryError(QuantkitError):
    """The device ran out of memory; the message says which knob to turn."""


class HubError(QuantkitError):
    """Talking to the Hub failed in a way retrying will not fix (auth, permissions, endpoint)."""


class PlanError(QuantkitError):
    """The plan request cannot be answered (bad tensor-parallel size, unknown scheme, ...)."""


class MissingDependencyError(QuantkitError):
    """An optional package a command needs is not installed; the hint names the extra."""


class Interrupted(QuantkitError, KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM; the message says what was kept for ``--resume``.

    Also a ``KeyboardInterrupt``, so callers that handle Ctrl-C keep doing so. ``signal`` is the
    signal's number (the CLI exits with 128 + it, as the shell does).
    """

    def __init__(self, message: str, *, signal: int, **parts: Any) -> None:
        super().__init__(message, **parts)
        self.signal = int(signal)


class DistributedError(QuantkitError):
    """A multi-rank run cannot start or lost a rank; finished layers stay for ``--resume``."""


class PeerLostError(DistributedError):
    """A collective failed because another rank is gone (that rank's own error says why)."""
