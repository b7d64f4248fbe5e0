"""The model's structure from its config alone: the meta module tree, where its decoder
layers are, their layer graph, and the checkpoint's names for its parameters.

Validation builds it from config.json and the shard headers (a model on the Hub is not
downloaded for it); the run builds it from the downloaded folder. No weight is read either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import ModelError
from .model import ModelGraph, derive_model_graph
from .names import CheckpointNames
from .skeleton import DecoderLocation, build_meta, locate_decoder, model_class


@dataclass
class ModelView:
    model: nn.Module  # on the meta device
    location: DecoderLocation
    graph: ModelGraph
    names: CheckpointNames

    def check_supported(self, where: str) -> None:
        """Everything about the model's structure that can be refused before a weight is read."""
        self.graph.check_supported(where)
        if self.names.fused:
            src = next(iter(self.names.fused))
            raise ModelError(f"{where}: {src} holds every expert of its block in one tensor; quantkit writes "
                             "one quantized tensor per expert, which transformers and vLLM read for this family "
                             "only fused (gpt-oss, Llama 4)", field="model.id",
                             hint="quantize a Mixture-of-Experts family whose checkpoint stores experts one by one "
                                  "(Mixtral, Qwen2/3-MoE, DeepSeek-V3)")
        for i in range(self.location.num_layers):
            prefix = self.graph.layer_prefix(i)
            fused = self.names.converted_under(prefix)
            if fused:
                raise ModelError(f"{where}: {prefix[:-1]}: checkpoint tensors such as {fused[0]} "
                                 "are converted on load by an operation quantkit cannot undo per expert "
                                 "(transformers' conversion mapping)", field="model.id",
                                 hint="only experts stacked per expert and gate/up concatenated are supported")


def config_from_dict(config: dict[str, Any], config_file: str, where: str):
    """config.json (read from ``config_file``) as its transformers config class, as
    ``from_pretrained`` would read it."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"{where}: model_type {model_type!r} is not one the installed transformers implements",
                         field="model.id", value=model_type,
                         hint="quantkit runs only models transformers implements (no remote code)")
    return _built(config_file, lambda: CONFIG_MAPPING[model_type].from_dict(config))


def model_view(config, source_names: Iterable[str], dtype: torch.dtype, config_file: str, where: str) -> ModelView:
    """Build the model's own class on the meta device and derive its layer graph."""
    model = _built(config_file, lambda: build_meta(model_class(config, where), config, dtype))
    location = locate_decoder(model, where)
    return ModelView(model, location, derive_model_graph(model, location), CheckpointNames(model, source_names))


def _built(config_file: str, build):
    """A config transformers refuses (a malformed rope_scaling, ...) is a `ModelError` naming
    the file, not a traceback."""
    try:
        return build()
    except ModelError:
        raise
    except Exception as e:  # transformers' config and model classes raise many types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"model.id: {config_file}: transformers cannot build the model from it "
                         f"({type(e).__name__}: {first})", field="model.id", file=config_file,
                         hint="fix or re-download config.json") from None
