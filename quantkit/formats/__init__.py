"""Export format plugins; importing this package registers every built-in format."""

from ..scheme import Scheme
from . import awq, compressed_tensors, gptq  # noqa: F401  (registers the formats)
from .base import FORMATS, Format, register_format


def default_format_for(scheme: Scheme) -> str:
    """compressed-tensors: vLLM maps every scheme in it to its fastest kernel (Marlin/Machete
    WNA16 incl. asymmetric zero points, CUTLASS W8A8 int8/FP8), which AWQ/GPTQ reach only by
    conversion and asymmetric GPTQ not at all (gptq_marlin's TYPE_MAP is symmetric-only)."""
    return "compressed-tensors"


__all__ = ["FORMATS", "Format", "default_format_for", "register_format"]
