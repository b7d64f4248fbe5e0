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
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..architectures import Architecture
from ..scheme import ActivationScheme, QuantizedWeight, Scheme
from ..targets import ANY_LINEAR, SchemeAssignment, pattern_error

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
    targets: list[str] = Field(
        [ANY_LINEAR], description="Linears to quantize: 'Linear' (all), full module names, or 're:<regex>'")
    ignore: list[str] = Field(
        [], description="Linears left in float, as targets (e.g. 're:.*\\.0\\.mlp\\.down_proj$')")

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if (why := pattern_error(p)) is not None:
                raise ValueError(why)
        return v

    def scheme(self) -> Scheme:
        """The scheme of every targeted Linear no override names."""
        raise NotImplementedError

    def assignment(self) -> SchemeAssignment:
        """Which Linears are quantized, and how."""
        return SchemeAssignment(self.scheme(), tuple(self.targets), tuple(self.ignore))

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
        self.assignment = params.assignment()

    def layer_schemes(self, prefix: str, arch: Architecture) -> dict[str, Scheme]:
        """The Linears of the decoder layer at ``prefix`` (``model.layers.3.``) to quantize,
        by their names inside the layer, and their schemes."""
        resolved = self.assignment.resolve(prefix + n for n in arch.linears)
        return {n[len(prefix):]: s for n, s in resolved.items()}

    @abstractmethod
    def quantize_layer(
        self, layer: nn.Module, arch: Architecture, calib: LayerCalibration,
        schemes: Mapping[str, Scheme] | None = None,
    ) -> dict[str, QuantizedWeight]:
        """Quantize the Linears of ``schemes`` (names inside the layer) with their schemes,
        or, without it, every Linear of ``arch.linears`` with ``self.scheme``; keys are those
        names. Linears left out stay float (their weights may still be rescaled by folding)."""

    def schemes_or_default(self, arch: Architecture, schemes: Mapping[str, Scheme] | None) -> dict[str, Scheme]:
        return dict(schemes) if schemes is not None else {n: self.scheme for n in arch.linears}

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
