"""The export format plugin protocol and its registry.

A format maps one Linear's ``QuantizedWeight`` to the tensors its checkpoint stores and the
model's scheme to a ``quantization_config``. Sharding, the index, tokenizer files and the
atomic rename are shared by every format (``checkpoint.py``); formats never know which
algorithm produced the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Callable, ClassVar

import torch

from ..errors import ExportError
from ..scheme import ActivationScheme, QuantizedWeight, Scheme


def scheme_groups(schemes: Scheme | Mapping[str, Scheme]) -> dict[Scheme, list[str]]:
    """The distinct schemes of a checkpoint and the full names of their Linears, in first-seen
    order; one scheme given alone stands for every Linear (no names)."""
    if isinstance(schemes, Scheme):
        return {schemes: []}
    groups: dict[Scheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    return groups


class Format(ABC):
    name: ClassVar[str]
    mixed_schemes: ClassVar[bool] = False
    """Whether the format describes Linears of different schemes in one checkpoint."""

    @abstractmethod
    def unsupported_reason(self, scheme: Scheme) -> str | None:
        """Why this format cannot store ``scheme``, or None when it can."""

    @abstractmethod
    def weight_tensors(
        self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Tensors for the Linear at ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``)."""

    def stacks(self, scheme: Scheme) -> bool:
        """Whether ``stacked_tensors`` packs Linears of ``scheme`` (else they go one at a time
        through ``weight_tensors``)."""
        return False

    def stacked_tensors(self, prefixes: list[str], stack: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors of Linears of one scheme and shape, packed as one stack (a layer's experts:
        one pass instead of hundreds of small ones): ``stack``'s tensors have a leading dim, one
        entry per name in ``prefixes``; returns the tensor of each field (``weight_packed``) with
        that leading dim, entry ``i`` byte for byte what ``weight_tensors`` gives the Linear
        ``prefixes[i]``. Only called when ``stacks(stack.scheme)``."""
        raise NotImplementedError(f"the {self.name} format packs Linears one at a time")

    @abstractmethod
    def quantization_config(
        self, schemes: Scheme | Mapping[str, Scheme], ignore: list[str], kv_cache: ActivationScheme | None = None
    ) -> dict:
        """The ``quantization_config`` entry of config.json.

        ``ignore`` lists the float Linears in compressed-tensors' convention: exact module
        names (``lm_head``) or ``re:`` patterns, as ``segment_pattern`` makes for a whole
        module tree (a vision tower) in whatever naming a loader uses.

        ``schemes`` is the one scheme of every quantized Linear, or a scheme per Linear's full
        name (a mixed recipe; formats without ``mixed_schemes`` accept one distinct scheme).

        ``kv_cache`` describes a quantized KV cache (its ``k_scale``/``v_scale`` tensors are
        written by the checkpoint writer); only call with it when ``kv_cache_reason`` is None.
        """

    def require(self, scheme: Scheme, where: str, kv_cache: ActivationScheme | None = None) -> None:
        """Raise ExportError naming ``where`` when this format cannot store ``scheme``/``kv_cache``.

        Recipe validation already refuses such pairs; this guards direct library use.
        """
        reason = self.unsupported_reason(scheme) or self.kv_cache_reason(kv_cache)
        if reason:
            raise ExportError(f"{where}: the {self.name} format cannot store this scheme: {reason}", file=where,
                              field="export.format", value=self.name)

    def mixed_reason(self) -> str | None:
        """Why this format cannot store a mixed recipe (overrides, ignored or untargeted
        decoder Linears), or None when it can."""
        if self.mixed_schemes:
            return None
        return (f"the {self.name} format has one scheme for every Linear; per-pattern overrides, "
                "ignore and targets need compressed-tensors")

    def single_scheme(self, schemes: Scheme | Mapping[str, Scheme]) -> Scheme:
        """The one scheme of a format without mixed schemes, or ExportError."""
        groups = scheme_groups(schemes)
        if len(groups) != 1:
            raise ExportError(f"quantization_config: {self.mixed_reason()}", field="export.format", value=self.name,
                              hint="use export.format: compressed-tensors")
        return next(iter(groups))

    def kv_cache_reason(self, kv_cache: ActivationScheme | None) -> str | None:
        """Why this format cannot describe ``kv_cache``, or None when it can (or none is asked)."""
        if kv_cache is None:
            return None
        return f"the {self.name} format cannot describe a quantized KV cache; use compressed-tensors"


_SEGMENT = (r"re:(.*\.)?", r"(\..*)?$")


def segment_pattern(segment: str) -> str:
    """A ``re:`` pattern (compressed-tensors' and vLLM's convention) matching every module
    whose dotted name has ``segment`` as a path segment, and everything under it."""
    import re

    return _SEGMENT[0] + re.escape(segment) + _SEGMENT[1]


def ignored_segments(ignore: list[str]) -> list[str]:
    """``ignore`` as plain names (what AWQ's ``modules_to_not_convert`` and other substring
    matchers take): exact names as they are, ``segment_pattern`` patterns as their segment;
    any other ``re:`` pattern (a router inside the layers, anchored at its end) as it is,
    which a substring matcher never matches and a regex matcher can use."""
    import re

    out = []
    for entry in ignore:
        if entry.startswith(_SEGMENT[0]) and entry.endswith(_SEGMENT[1]):
            entry = re.sub(r"\\(.)", r"\1", entry[len(_SEGMENT[0]):-len(_SEGMENT[1])])
        out.append(entry)
    return out


FORMATS: dict[str, type[Format]] = {}


def register_format(name: str) -> Callable[[type[Format]], type[Format]]:
    def wrap(cls: type[Format]) -> type[Format]:
        cls.name = name
        FORMATS[name] = cls
        return cls

    return wrap
