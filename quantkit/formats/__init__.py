"""Export format plugins; importing this package registers every built-in format."""

from .base import FORMATS, Format, register_format

__all__ = ["FORMATS", "Format", "register_format"]
