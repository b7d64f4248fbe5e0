"""The quantizer plugin protocol and its registry.

A quantizer turns one float decoder layer (on the device) plus a way to stream that layer's
calibration inputs through it into a ``QuantizedWeight`` per Linear. It may also rewrite the
layer's float parameters (AWQ and SmoothQuant fold scales into norms), which the engine then
exports as they are. It never sees a file format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Literal, Mapping, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..graph.types import LayerGraph
from ..scheme import ActivationScheme, QuantizedWeight, Scheme

InputHook = Callable[[torch.Tensor], None]
# Called with a Linear's input on the quantized model's stream and, for the same tokens, on
# the float model's stream (both ``[tokens, in_features]``).
PairedHook = Callable[[torch.Tensor, torch.Tensor], None]

# Hook names for what the layer's attention receives, besides Linear names: the key and
# value tensors ``[batch, kv_heads, tokens, head_dim]`` after the model's own k_norm and RoPE,
# which is what a KV cache stores and what its scales must cover.
ATTENTION_KEY = "@attention.key"
ATTENTION_VALUE = "@attention.value"


class LayerCalibration(Protocol):
    """Streams the current layer's calibration inputs through the float layer."""

    def run(self, hooks: Mapping[str, InputHook]) -> None:
        """Run every calibration batch through the layer.

        ``hooks`` maps a Linear's name inside the layer (``"mlp.down_proj"``) to a function
        called with that Linear's input, flattened to ``[tokens, in_features]``;
        ``ATTENTION_KEY`` / ``ATTENTION_VALUE`` to one called with the attention's key/value.
        """
        ...

    def run_paired(self, hooks: Mapping[str, PairedHook]) -> None:
        """Run every calibration batch through the layer twice: as the quantized model so far
        gives it, and as the float model gives it; each hook gets both inputs of its Linear
        for the same tokens. Only for quantizers with ``needs_float_inputs``."""
        ...

    def generator(self, name: str) -> torch.Generator:
        """The generator for random draws about ``name`` (a Linear or group) in this layer,
        seeded from the recipe's seed and the layer index: never draw from the global RNG."""
        ...


class QuantizerParams(BaseModel):
    """Recipe parameters of one method; subclasses fix ``method`` to a Literal."""

    model_config = ConfigDict(extra="forbid")

    method: str
    rotate: Literal["none", "hadamard"] = Field(
        "none", description="hadamard: rotate the residual stream (and each value head) by randomized Hadamards "
        "fused into the weights before quantizing; same function, fewer outliers; vLLM serves it as is")

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
    # The engine then keeps the float model's calibration stream beside the quantized one
    # (twice the calibration activations) for ``LayerCalibration.run_paired``.
    needs_float_inputs: bool = False
    default_format: ClassVar[str] = "compressed-tensors"

    def __init__(self, params: QuantizerParams, model_config: dict) -> None:
        self.params = params
        self.model_config = model_config
        self.scheme = params.scheme()

    @abstractmethod
    def quantize_layer(
        self, layer: nn.Module, graph: LayerGraph, calib: LayerCalibration
    ) -> dict[str, QuantizedWeight]:
        """Quantize every unit of ``graph`` (``graph.linears``) in ``layer``; keys are their names.

        ``graph`` says which units share an input (``graph.groups``), what produces it and
        whether a scale folds into it exactly (``group.foldable``, ``graph.fold.fold_scales``)."""

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
