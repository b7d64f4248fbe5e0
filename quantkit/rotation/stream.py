"""The residual stream rotated offline, one layer at a time (QuaRot / SpinQuant R1 and R2).

With a randomized Hadamard ``Q`` on the residual stream the model computes the same logits:
the embedding rows become ``E Q``, every decoder layer takes ``rotate_layer`` (its reader
norms' weights folded into the Linears they feed, readers ``W Q``, writers ``Qᵀ W``), the final
norm's weight moves into the head (``W_head diag(w) Q``) and is left neutral. Each head's value
vectors are further rotated by a Hadamard of the head size, undone in o_proj's columns. All of
it is fused into the weights, so vLLM serves the result as any other checkpoint; what changes
is what the quantizer sees: channels with outliers are spread over all of them.

The edits apply as the runner loads each module (``ModelRunner.edits``), so the rotation
streams with everything else and a layer is never rotated twice. A tied head cannot equal
both ``E Q`` and ``W diag(w) Q``: the output unties it (``tie_word_embeddings: false`` and an
``lm_head.weight`` of its own).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from ..graph.flow import norm_weight_kind, rotation_invariant
from ..graph.model import ModelGraph
from ..graph.rotate import rotate_heads, rotate_layer
from ..graph.runtime import ModelRunner, describe_outside
from ..graph.skeleton import DecoderLocation
from .hadamard import random_hadamard

log = logging.getLogger(__name__)

_ROWS_PER_STEP = 8192  # embedding/head rows rotated at once: float64 work stays ~0.5 GB at 8192 wide


@dataclass(frozen=True)
class RotationTargets:
    """The modules outside the decoder layers a stream rotation edits, and how."""

    embed: str
    norm: str
    norm_kind: str  # "norm" (x̂·w) or "offset_norm" (x̂·(1 + w))
    head: str
    untie: bool  # the head is tied to the embedding: the output needs its own


def rotation_targets(model: nn.Module, graph: ModelGraph, location: DecoderLocation, where: str) -> RotationTargets:
    """Whether the residual stream of ``model`` (the meta skeleton) rotates exactly, and what
    outside its layers the rotation edits; a ModelError in one line naming why not. Reads no
    weight, so validation runs it too."""

    def refuse(why: str) -> None:
        raise ModelError(f"{where}: quantization.rotate: {why}", field="quantization.rotate",
                         hint="use rotate: none for this model")

    for t, g in enumerate(graph.types):
        if not g.rotatable:
            i = graph.layers_of(t)[0]
            refuse(f"{graph.layer_prefix(i)[:-1]} ({g.layer_class}): {g.rotation_blockers()[0]}")
    modules = {id(m): n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear) or head.bias is not None:
        refuse("the model's input embedding is not a lookup table or its head is not a bias-free Linear")
    norms = []
    for path, _ in describe_outside(model, location.layers):
        mod = model.get_submodule(path)
        if mod is embed or mod is head:
            continue
        if any(p.dim() != 1 for p in mod.parameters()):
            refuse(f"{path} is outside the decoder layers and may write into the residual stream "
                   "(image features), which would reach the layers unrotated")
        norms.append(path)
    if len(norms) != 1:
        refuse(f"expected one final norm outside the decoder layers, found {norms or 'none'}")
    kind = _final_norm_kind(model.get_submodule(norms[0]), embed.embedding_dim)
    if kind is None:
        refuse(f"the final norm {norms[0]} does not commute with a rotation (it centres its input or has a bias)")
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    head_name = modules[id(head)]
    return RotationTargets(modules[id(embed)], norms[0], kind, head_name, f"{head_name}.weight" in tied)


class StreamRotation:
    """The edits that rotate ``runner``'s model; refuses (ModelError, one line) a model whose
    stream cannot be rotated exactly, before any weight is read."""

    def __init__(self, runner: ModelRunner, seed: int = 0):
        graph = runner.graph
        t = rotation_targets(runner.model, graph, runner.location, runner.where)
        self.embed, self.norm, self.norm_kind, self.head, self.untie = t.embed, t.norm, t.norm_kind, t.head, t.untie
        gen = torch.Generator().manual_seed(seed)
        self.q = random_hadamard(runner.model.get_input_embeddings().embedding_dim, gen)
        head_dims = {g.producer.channels.head_dim for t in graph.types for g in t.groups
                     if g.producer.kind == "attention_value" and g.producer.exact}
        self.head_q = {d: random_hadamard(d, gen) for d in sorted(head_dims)}
        self.graph = graph
        self._read = runner.read_source
        if self.untie:
            log.info("rotation: the head was tied to the embedding; the output has its own lm_head "
                     "(tie_word_embeddings: false)")

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules outside the decoder layers whose parameters the rotation changes."""
        return (self.embed, self.norm, self.head)

    def config_updates(self) -> dict[str, object]:
        return {"tie_word_embeddings": False} if self.untie else {}

    @torch.no_grad()
    def edit_layer(self, i: int, layer: nn.Module) -> None:
        g = self.graph.layer(i)
        q = self.q.to(layer_device(layer))
        rotate_layer(layer, g, q)
        for group in g.groups:
            p = group.producer
            if p.kind == "attention_value" and p.exact:
                rotate_heads(layer, group, self.head_q[p.channels.head_dim].to(q.device))

    @torch.no_grad()
    def edit_module(self, name: str, module: nn.Module) -> None:
        if name == self.embed:
            _rotate_rows(module.weight, self.q, None)
        elif name == self.norm:
            module.weight.fill_(0.0 if self.norm_kind == "offset_norm" else 1.0)
        elif name == self.head:
            w = self._read(f"{self.norm}.weight", module.weight).to(torch.float64)
            _rotate_rows(module.weight, self.q, 1 + w if self.norm_kind == "offset_norm" else w)


def layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


def _rotate_rows(weight: torch.Tensor, q: torch.Tensor, col_scale: torch.Tensor | None) -> None:
    """``weight ← (weight · diag(col_scale)) Q`` in place, a block of rows at a time in float64."""
    q = q.to(weight.device)
    scale = None if col_scale is None else col_scale.to(weight.device)
    for start in range(0, weight.shape[0], _ROWS_PER_STEP):
        rows = weight[start:start + _ROWS_PER_STEP]
        x = rows.to(torch.float64)
        if scale is not None:
            x = x * scale
        rows.copy_((x @ q).to(rows.dtype))


def _final_norm_kind(meta_norm: nn.Module, dim: int) -> str | None:
    """``norm`` / ``offset_norm`` if the final norm takes a rotation once its weight is neutral,
    tested on a float64 copy of the module (its own code, random weights)."""
    if getattr(meta_norm, "weight", None) is None:
        return None
    m = copy.deepcopy(meta_norm).to_empty(device="cpu").to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
    kind = norm_weight_kind(m, dim, gen)
    if kind == "unfoldable" or not rotation_invariant(m, kind, dim, gen):
        return None
    return kind
