"""Exceptions users see. Each names the field, file or module at fault and what to do.

The CLI prints ``QuantkitError`` subclasses as one line and exits non-zero; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class QuantkitError(Exception):
    """Base class of every error quantkit reports to a user."""


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
