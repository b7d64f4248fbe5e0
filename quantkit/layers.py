"""Real transformers modules, built one at a time from a meta-device skeleton.

Using the model's own decoder-layer class keeps attention, RoPE and norms exactly what
transformers (and so the reference model) computes; building the skeleton on the meta device
costs no memory, and each layer gets real tensors only while the engine works on it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .architectures import Architecture
from .model import ModelSource


class ModelSkeleton:
    """The model's module tree on the meta device, plus a rotary embedding on the device."""

    def __init__(self, source: ModelSource, arch: Architecture, device: torch.device, dtype: torch.dtype):
        self.source, self.arch, self.device, self.dtype = source, arch, device, dtype
        self.config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        with torch.device("meta"):
            self.meta = AutoModelForCausalLM.from_config(
                self.config, attn_implementation="sdpa", dtype=dtype
            )
        self.rotary = type(self.meta.model.rotary_emb)(config=self.config).to(device)
        self._positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def layer_prefix(self, i: int) -> str:
        return f"{self.arch.layers_prefix}.{i}."

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights read from the shards onto the device."""
        layer = copy.deepcopy(self.meta.get_submodule(self.arch.layers_prefix)[i])
        prefix = self.layer_prefix(i)
        # One tensor at a time onto the device: the host never holds the whole layer.
        state = {name[len(prefix):]: self.source.tensor(name).to(device=self.device, dtype=self.dtype)
                 for name in self.source.weight_map if name.startswith(prefix)}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.to(device=self.device, dtype=self.dtype).eval()

    def position_embeddings(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len not in self._positions:
            pos = torch.arange(seq_len, device=self.device)[None]
            probe = torch.empty(1, seq_len, 1, device=self.device, dtype=self.dtype)
            self._positions[seq_len] = self.rotary(probe, pos)
        return self._positions[seq_len]

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One decoder layer, causal, no cache: what every calibration pass needs."""
        out = layer(hidden, position_embeddings=self.position_embeddings(hidden.shape[1]))
        return out[0] if isinstance(out, tuple) else out

    def embed_weight(self) -> torch.Tensor:
        return self.source.tensor(self.arch.embed + ".weight")

    def embed_weight_on_device(self) -> torch.Tensor:
        return self.source.tensor_on(self.arch.embed + ".weight", self.device, self.dtype)

    def lm_head_source_name(self) -> str:
        """The source tensor that holds the output head (the embedding when tied)."""
        name = self.arch.embed if self.tied and not self.source.has(self.arch.lm_head + ".weight") else self.arch.lm_head
        return name + ".weight"

    def lm_head_weight(self) -> torch.Tensor:
        return self.source.tensor(self.lm_head_source_name())

    def final_norm(self) -> nn.Module:
        norm = copy.deepcopy(self.meta.get_submodule(self.arch.final_norm))
        norm.load_state_dict(self.source.tensors_with_prefix(self.arch.final_norm + "."), assign=True)
        return norm.to(device=self.device, dtype=self.dtype).eval()


def embed(tokens: torch.Tensor, weight: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return F.embedding(tokens.to(device), weight.to(device=device, dtype=dtype))
