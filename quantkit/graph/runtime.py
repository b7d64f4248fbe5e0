"""ModelRunner: the model as itself, streamed one decoder layer at a time.

The model's own class is built on the meta device. Per-layer arguments come from its own
top-level forward (``capture.py``); a decoder layer is a deep copy of the meta layer given
its checkpoint tensors; the head (final norm, lm_head, logit softcap or scale) is the model's
own forward with the layers skipped and the last hidden state injected. Modules outside the
layers are loaded from the checkpoint the first time the forward touches them, so a vision
tower is never read.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from ..errors import ModelError, NumericsError
from ..model import ModelSource
from ..source_dequant import float_view
from .capture import LayerCall, capture, inject, materialize_on_use
from .experts import split_fused
from .skeleton import free, is_meta, owner_of
from .view import ModelView, model_view

log = logging.getLogger(__name__)


@dataclass
class LayerInputs:
    """One batch: the hidden state entering the next layer, and every layer's arguments
    (shared, by reference, between batches of the same shape)."""

    hidden: torch.Tensor
    calls: list[LayerCall]


class WeightEdit(Protocol):
    """A function-preserving change to the weights applied as each module is loaded (the
    stream rotation, the online down_proj Hadamard): layers by ``edit_layer``, modules outside
    them listed in ``modules``."""

    modules: tuple[str, ...]

    def edit_layer(self, i: int, layer: nn.Module) -> None: ...

    def edit_module(self, name: str, module: nn.Module) -> None: ...

    def config_updates(self) -> dict[str, Any]:
        """Keys of config.json the edited checkpoint needs changed (an untied head)."""
        ...

    def quantization_config_updates(self) -> dict[str, Any]:
        """Keys of config.json's quantization_config it needs (a transform vLLM applies online)."""
        ...

    def layer_tensors(self, i: int) -> dict[tuple[str, str], torch.Tensor]:
        """Tensors the checkpoint needs beside layer ``i``'s own, by (module inside the layer, leaf name)."""
        ...


class ModelRunner:
    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype, where: str = "model",
                 view: ModelView | None = None):
        """``view``: the run's validation's (``preflight.check_run``), taken over when it was built
        from this very config.json, tensor names and ``dtype`` (else built anew); it must not
        serve another runner, which would share and edit its skeleton."""
        # A checkpoint quantized by its authors (DeepSeek-V3's FP8, gpt-oss's MXFP4) is read as
        # the float one it stands for; its scale tensors are consumed, never copied.
        self.source, self.device, self.dtype, self.where = float_view(source), device, dtype, where
        if view is not None and view.built_from(source.config, self.source.weight_map, dtype):
            self.config = view.model.config
        else:
            view = self._build_view(self.source, dtype, where)
        self.model, self.location, self.graph, self.names = view.model, view.location, view.graph, view.names
        self.layers: nn.ModuleList = self.model.get_submodule(self.location.layers)
        self._view = view
        self._tuple_outputs = False
        self._loaded: list[nn.Module] = []
        self.edits: list[WeightEdit] = []

    def _build_view(self, source: ModelSource, dtype: torch.dtype, where: str) -> ModelView:
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
        except (ValueError, KeyError, OSError) as e:
            raise ModelError(f"{where}: transformers cannot read {source.path / 'config.json'} ({e})",
                             field="model.id", file=source.path / "config.json",
                             hint="quantkit runs only models transformers implements") from None
        return model_view(self.config, source.config, source.weight_map, dtype,
                          str(source.path / "config.json"), where)

    # ------------------------------------------------------------------ facts
    @property
    def num_layers(self) -> int:
        return self.location.num_layers

    @property
    def text_config(self):
        return self.model.get_submodule(self.location.text_model).config if self.location.text_model else \
            self.model.config

    def layer_prefix(self, i: int) -> str:
        return self.graph.layer_prefix(i)

    def check_supported(self) -> None:
        """Everything that can be refused before a weight is read."""
        self._view.check_supported(self.where)

    def outside_text_sources(self) -> list[str]:
        """Checkpoint names of the language model's tensors outside its decoder layers (embedding,
        final norm, lm_head or the tensor it is tied to): checked before hours of layer work."""
        text = self.location.text_model + "." if self.location.text_model else ""
        layers = self.location.layers + "."
        heads = {f"{n}.weight" for n, m in self.model.named_modules()
                 if m is self.model.get_output_embeddings()}
        wanted = [n for n, _ in self.model.named_parameters()
                  if (n.startswith(text) and not n.startswith(layers)) or n in heads]
        return sorted({self.names.to_source[n] for n in wanted if n in self.names.to_source})

    def layer_sources(self, i: int) -> dict[str, str]:
        """Layer ``i``'s parameters (names relative to the layer) → checkpoint tensor names."""
        return self.names.under(self.layer_prefix(i))

    # ------------------------------------------------------------------ loading
    def read_source(self, model_name: str, like: torch.Tensor) -> torch.Tensor:
        """Parameter ``model_name`` as the checkpoint has it (no edit applied), on the device."""
        src = self.names.to_source.get(model_name)
        if src is None:
            tied = getattr(self.model, "all_tied_weights_keys", None) or {}
            target = tied.get(model_name)
            src = self.names.to_source.get(target) if target else None
        if src is None:
            raise ModelError(f"{self.where}: tensor {model_name} is missing from {self.source.path}",
                             field="model.id", file=self.source.path,
                             hint="the checkpoint does not match its config.json")
        dtype = self.dtype if like.is_floating_point() else like.dtype
        t = self.source.tensor_on(src, self.device, dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise self._damaged(src)
        return t

    def _damaged(self, src: str) -> NumericsError:
        path = self.source.path / self.source.weight_map.get(src, "?")
        return NumericsError(f"model: tensor {src} in {path} contains NaN or Inf", file=path,
                             hint="the checkpoint is damaged (re-download or re-convert it)")

    def check_finite(self, layer: nn.Module, i: int) -> None:
        """One host sync for the whole layer; names the bad tensor only when there is one."""
        params = [p for p in layer.parameters() if p.is_floating_point()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            sources = self.layer_sources(i)
            for name, p in layer.named_parameters():
                if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                    raise self._damaged(sources.get(name, self.layer_prefix(i) + name))

    def _make_real(self, name: str, module: nn.Module) -> None:
        """Buffers from the model's own init, parameters from the checkpoint (assigned, not copied)."""
        _real_buffers(self.model, name, module, self.device)
        prefix = f"{name}." if name else ""
        state = {k: self.read_source(prefix + k, v) for k, v in module.state_dict().items()}
        module.load_state_dict(state, strict=True, assign=True)
        for edit in self.edits:
            if name in edit.modules:
                edit.edit_module(name, module)
        self._loaded.append(module)

    def edited_modules(self) -> list[str]:
        """Modules outside the decoder layers whose parameters an edit changes."""
        return sorted({n for e in self.edits for n in e.modules})

    def edited_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter of ``edited_modules`` as edited (model names), one module on the
        device at a time."""
        for name in self.edited_modules():
            module = copy.deepcopy(self.model.get_submodule(name))
            self._make_real(name, module)
            for k, t in module.named_parameters():
                yield f"{name}.{k}", t.detach()
            self.release()

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` (a copy of the meta layer) with its checkpoint tensors on the
        device, all read in one go (``TensorReader.to_device_all``); checkpoint tensors under
        the layer that it has no parameter for stay unconsumed and are copied as they are on
        export."""
        layer = copy.deepcopy(self.layers[i])
        _real_buffers(self.model, self.layer_prefix(i)[:-1], layer, self.device)
        sources = self.layer_sources(i)
        fused = self._fused_sources(i)
        keys = list(layer.state_dict())
        with self.source.reader() as reader:
            read = reader.to_device_all([*fused, *(sources[k] for k in keys if k in sources)], self.device,
                                        self.dtype)
        state = self._fused_experts(layer, fused, read)
        for k in keys:
            if k in state:
                continue
            src = sources.get(k)
            if src is None:
                raise ModelError(f"{self.where}: tensor {self.layer_prefix(i)}{k} is missing from "
                                 f"{self.source.path}", field="model.id", file=self.source.path,
                                 hint="the checkpoint does not match its config.json")
            state[k] = read[src]
        layer.load_state_dict(state, strict=True, assign=True)
        for edit in self.edits:
            edit.edit_layer(i, layer)
        return layer.eval()

    def _fused_sources(self, i: int) -> dict[str, tuple[str, str]]:
        """Checkpoint tensors of layer ``i`` holding every expert of a block (gpt-oss, Llama 4)
        → (experts module relative to the layer, fused parameter name)."""
        prefix = self.layer_prefix(i)
        return {src: (container[len(prefix):], leaf) for src, (container, leaf) in self.names.fused.items()
                if container.startswith(prefix)}

    @staticmethod
    def _fused_experts(layer: nn.Module, fused: dict[str, tuple[str, str]],
                       read: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-expert tensors from the ``fused`` checkpoint tensors ``read``, split as the fused
        module lays them out."""
        out: dict[str, torch.Tensor] = {}
        for src, (rel, leaf) in fused.items():
            layout = layer.get_submodule(rel).layout
            out.update({f"{rel}.{k}": v for k, v in split_fused(layout, leaf, read[src]).items()})
        return out

    # ------------------------------------------------------------------ running
    def capture(self, batches: list[torch.Tensor]) -> list[LayerInputs]:
        """Embed each batch of token ids and record every layer's arguments through the
        model's own forward; batches of one shape share their arguments."""
        undo = materialize_on_use(self.model, self.layers, self._make_real)
        # Before the forward, not on first call: Llama 4 moves the ids to the embedding's device
        # before calling it, which on the meta device gives garbage.
        embed = self.model.get_input_embeddings()
        if is_meta(embed):
            self._make_real(next(n for n, m in self.model.named_modules() if m is embed), embed)
        shared: dict[tuple, list[LayerCall]] = {}
        out = []
        try:
            for ids in batches:
                ids = ids.to(self.device)
                got = capture(lambda: self.model(input_ids=ids, use_cache=False), self.layers)
                self._tuple_outputs = got.tuple_outputs
                calls = shared.setdefault(tuple(ids.shape), got.calls)
                out.append(LayerInputs(got.hidden, calls))
        finally:
            undo()
            self.release()
        return out

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
        out = layer(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The model's own head on the last layer's output: final norm, lm_head and whatever
        its forward applies to logits (Gemma's softcap, Cohere's logit scale)."""
        embed = self.model.get_input_embeddings()
        zeros = hidden.new_zeros(hidden.shape)
        embed.forward = lambda *a, **k: zeros
        undo = materialize_on_use(self.model, self.layers, self._make_real, exclude=(embed,))
        try:
            out = inject(lambda: self.model(input_ids=ids.to(self.device), use_cache=False), self.layers, hidden,
                         self._tuple_outputs)
        finally:
            undo()
            embed.__dict__.pop("forward", None)
        return out.logits if hasattr(out, "logits") else out[0]

    def release(self) -> None:
        """Free every module loaded outside the decoder layers (embedding, head, ...)."""
        for m in self._loaded:
            free(m)
        self._loaded = []


def _real_buffers(model: nn.Module, name: str, module: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (RoPE tables, Gemma's embedding scale) computed by the model's
    own ``_init_weights``; parameters stay on the meta device, where init is a no-op."""
    found = False
    for sub in module.modules():
        for bname, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_meta:
                sub._buffers[bname] = torch.empty_like(buf, device=device)
                found = True
    if not found:  # most decoder layers: nothing to compute
        return
    init = owner_of(model, name)._init_weights
    with torch.no_grad():
        for sub in module.modules():
            init(sub)


def describe_outside(model: nn.Module, layers_path: str) -> list[tuple[str, str]]:
    """The modules outside the decoder layers that hold weights, each with why it stays in
    float: ``[(module path, reason)]``."""
    inside = layers_path.split(".")
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: list[tuple[str, str]] = []

    def walk(prefix: str, mod: nn.Module, depth: int) -> None:
        for child_name, child in mod.named_children():
            path = f"{prefix}{child_name}"
            if depth < len(inside) and child_name == inside[depth]:
                if depth + 1 < len(inside):
                    walk(path + ".", child, depth + 1)
                continue
            if not any(True for _ in child.parameters()):
                continue
            out.append((path, _why_float(child, embed, head)))

    walk("", model, 0)
    return out


def _why_float(mod: nn.Module, embed: Any, head: Any) -> str:
    if mod is embed:
        return "input embedding (a lookup, not a matmul)"
    if mod is head:
        return "output head (lm_head): kept in float for accuracy, as vLLM and llm-compressor do"
    params = list(mod.parameters())
    if params and all(p.dim() == 1 for p in params):
        return "final norm"
    return "not part of the language decoder (vision tower, projector, ...): copied as it is"
