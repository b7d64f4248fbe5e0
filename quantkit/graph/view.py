"""The model's structure from its config alone: the meta module tree, where its decoder
layers are, their layer graph, and the checkpoint's names for its parameters.

Validation builds it from config.json and the shard headers (a model on the Hub is not
downloaded for it); the run builds it from the downloaded folder. No weight is read either way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import ModelError
from .experts import InputWeightedExperts
from .model import ModelGraph, derive_model_graph
from .names import CheckpointNames
from .skeleton import DecoderLocation, build_meta, locate_decoder, model_class


@dataclass
class ModelView:
    model: nn.Module  # on the meta device
    location: DecoderLocation
    graph: ModelGraph
    names: CheckpointNames
    # What it was built from: config.json, the checkpoint's tensor names and the skeleton's dtype.
    config_json: dict[str, Any]
    source_names: frozenset[str]
    dtype: torch.dtype

    def built_from(self, config_json: dict[str, Any], source_names: Iterable[str], dtype: torch.dtype) -> bool:
        """Whether ``model_view`` given these would build this very view: a run takes over its
        validation's (a Qwen3-30B-A3B skeleton, its names and graph cost seconds) only then, so
        a config.json or shard that changed in between is never read through a stale view."""
        return dtype == self.dtype and config_json == self.config_json and frozenset(source_names) == self.source_names

    def check_supported(self, where: str) -> None:
        """Everything about the model's structure that can be refused before a weight is read."""
        self.graph.check_supported(where)
        for src, (container, _) in self.names.fused.items():
            if isinstance(self.model.get_submodule(container), InputWeightedExperts):
                continue  # Llama 4: per-expert tensors, which vLLM's and transformers' loaders both read
            raise ModelError(f"{where}: {src} holds every expert of its block in one tensor; vLLM loads this "
                             "family's quantized experts (GptOssModel._load_weights_other, vllm/model_executor/"
                             "models/gpt_oss.py) only under its internal parameter names "
                             "(experts.{e}.w13_weight_packed) and skips per-expert checkpoint names "
                             "(experts.{e}.gate_proj.weight_packed) without an error, and transformers reads "
                             "gpt-oss experts only as fused float tensors", field="model.id",
                             hint="quantize a Mixture-of-Experts family whose experts vLLM and transformers read "
                                  "per expert (Mixtral, Qwen2/3-MoE, DeepSeek-V3, Llama 4)")
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


def model_view(config, config_json: dict[str, Any], source_names: Iterable[str], dtype: torch.dtype,
               config_file: str, where: str) -> ModelView:
    """Build the model's own class (``config``, read from ``config_json``) on the meta device
    and derive its layer graph."""
    snapshot = copy.deepcopy(config_json)  # before anything can edit it
    names = frozenset(source_names)
    model = _built(config_file, lambda: build_meta(model_class(config, where), config, dtype))
    location = locate_decoder(model, where)
    return ModelView(model, location, derive_model_graph(model, location), CheckpointNames(model, names),
                     snapshot, names, dtype)


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
