"""The quantizer plugin protocol and its registry.

A quantizer turns one float decoder layer (on the device) plus a way to stream that layer's
calibration inputs through it into a ``QuantizedWeight`` per Linear. It may also rewrite the
layer's float parameters (AWQ and SmoothQuant fold scales into norms), which the engine then
exports as they are. It never sees a file format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Mapping, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..architectures import Architecture
from ..scheme import ActivationScheme, QuantizedWeight, Scheme

InputHook = Callable[[torch.Tensor], None]


class LayerCalibration(Protocol):
    """Streams the current layer's calibration inputs through the float layer."""

    def run(self, hooks: Mapping[str, InputHook]) -> None:
        """Run every calibration batch through the layer.

        ``hooks`` maps a Linear's name inside the layer (``"mlp.down_proj"``) to a function
        called with that Linear's input, flattened to ``[tokens, in_features]``.
        """
        ...

    def generator(self, name: str) -> torch.Generator:
        """The generator for random draws about ``name`` (a Linear or group) in this layer,
        seeded from the recipe's seed and the layer index: never draw from the global RNG."""
        ...


class QuantizerParams(BaseModel):
    """Recipe parameters of one method; subclasses fix ``method`` to a Literal."""

    model_config = ConfigDict(extra="forbid")

    method: str

    def scheme(self) -> Scheme:
        raise NotImplementedError

    def kv_cache_scheme(self) -> ActivationScheme | None:
        """The KV-cache quantization this method calibrates, if any."""
        return None


class Quantizer(ABC):
    """Base of every quantizer; subclasses set ``Params`` and register with a name."""

    Params: ClassVar[type[QuantizerParams]]
    # Read from the instance: a method may need data only for some parameters (fp8 static
    # activations, int8 with GPTQ weights) and sets it in __init__.
    needs_calibration: bool = True
    default_format: ClassVar[str] = "compressed-tensors"

    def __init__(self, params: QuantizerParams, model_config: dict) -> None:
        self.params = params
        self.model_config = model_config
        self.scheme = params.scheme()

    @abstractmethod
    def quantize_layer(
        self, layer: nn.Module, arch: Architecture, calib: LayerCalibration
    ) -> dict[str, QuantizedWeight]:
        """Quantize every Linear of ``arch.linears`` in ``layer``; keys are those names."""

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Float tensors to export beside the last layer quantized (e.g. KV-cache scales),
        named relative to the layer (``"self_attn.k_scale"``)."""
        return {}


QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        QUANTIZERS[name] = cls
        return cls

    return wrap
