"""The export format plugin protocol and its registry.

A format maps one Linear's ``QuantizedWeight`` to the tensors its checkpoint stores and the
model's scheme to a ``quantization_config``. Sharding, the index, tokenizer files and the
atomic rename are shared by every format (``checkpoint.py``); formats never know which
algorithm produced the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

from ..scheme import QuantizedWeight, Scheme


class Format(ABC):
    name: ClassVar[str]

    @abstractmethod
    def unsupported_reason(self, scheme: Scheme) -> str | None:
        """Why this format cannot store ``scheme``, or None when it can."""

    @abstractmethod
    def weight_tensors(
        self, prefix: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Tensors for the Linear at ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``)."""

    @abstractmethod
    def quantization_config(self, scheme: Scheme, ignore: list[str]) -> dict:
        """The ``quantization_config`` entry of config.json; ``ignore`` lists float Linears."""


FORMATS: dict[str, type[Format]] = {}


def register_format(name: str) -> Callable[[type[Format]], type[Format]]:
    def wrap(cls: type[Format]) -> type[Format]:
        cls.name = name
        FORMATS[name] = cls
        return cls

    return wrap
