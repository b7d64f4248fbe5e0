"""Quantizer plugins; importing this package registers every built-in method."""

from . import awq, fp8, gptq, int8_dynamic, int8_static, rtn  # noqa: F401
from .base import QUANTIZERS, Quantizer, QuantizerParams, register_quantizer

__all__ = ["QUANTIZERS", "Quantizer", "QuantizerParams", "register_quantizer"]
