"""A Hadamard on down_proj's input that vLLM applies at run time (QuaRot's R4, online).

The MLP's intermediate activations (SiLU(gate)·up) have outlier channels no offline rotation
reaches: nothing linear sits between the elementwise product and down_proj. vLLM can rotate
them on the fly, so the weight side is fused here (``W ← W·Hₙ``, then quantized) and the
checkpoint's ``quantization_config.transform_config`` tells vLLM to apply ``x ← x·Hₙ`` to
down_proj's input. ``Hₙ`` is block-diagonal: Sylvester blocks ``H_b/√b`` of the largest power
of two ``b ≤ 2¹⁵`` dividing the intermediate size (512 for SmolLM2's 1536, 2048 for Llama-3-8B's
14336), because that is what vLLM's fast kernel computes.

What vLLM does, read from its source (vllm/model_executor/layers/quantization/compressed_tensors/
``compressed_tensors.py`` and ``transform/{linear,module}.py``):

- ``CompressedTensorsConfig`` validates ``transform_config`` with compressed-tensors'
  ``TransformConfig`` when it is non-empty; ``get_linear_transform_schemes`` gives every
  ``LinearBase`` whose (vLLM) name matches an ``apply`` entry's ``targets`` (``re:`` = regex) and
  whose location is online (``input``/``output``) a ``CompressedTensorsLinearTransformMethod``
  wrapping its quantized (any scheme) or unquantized method: ``x = transform(x)`` before the
  Linear's own ``apply``, which asserts the Linear has no bias. Fused-MoE experts are not
  ``LinearBase``: never transformed. Offline locations (``weight_input``) are ignored there.
- ``HadamardTransform.forward``: for ``type: hadamard`` it calls ``ops.hadacore_transform`` on
  the last dimension, unflattened into blocks of ``head_dim`` when that is set; that CUDA
  kernel computes ``x·H/√n`` with ``H`` the Sylvester matrix and accepts only powers of two up
  to 2¹⁵ (fp16/bf16). Any other ``type`` multiplies by the tensor loaded from the checkpoint as
  ``<linear>.<scheme name>_<location>.weight`` (divided by √size after loading, shared by every
  Linear of the scheme). ``perm`` (``randomize``) is never read.
- Online transforms raise ``NotImplementedError`` under tensor parallelism > 1; NVFP4 W4A4
  Linears with ``head_dim`` 16–128 take a QUTLASS kernel that reads the loaded tensor.

The schema (compressed-tensors 0.20, ``compressed_tensors/transform/transform_config.py``,
``transform_scheme.py``, ``transform_args.py``; all ``extra="forbid"``)::

    TransformConfig:  config_groups: dict[str, TransformScheme]
    TransformScheme:  type: str; apply: list[TransformArgs] = []; randomize: bool = False;
                      requires_grad: bool = False; head_dim: int | None = None;
                      precision: TorchDtype = torch.float32
    TransformArgs:    targets: list[str]; location: "input" | "weight_input" | "weight_output" |
                      "output" | "k_cache" | "q_attn"; inverse: bool = False; ignore: list[str] = []

So the config written is one ``type: hadamard`` scheme, ``head_dim: b``, applied at
``location: input`` of ``re:.*mlp\\.down_proj$``; the ±1 block is also written as each
down_proj's ``R4_input.weight`` (the loader expects the parameter; vLLM's fast path ignores it).
quantkit refuses, before any weight is read, what vLLM would not apply or not apply exactly: a
format other than compressed-tensors, FP4 activations (the QUTLASS path, unchecked), a method
that folds scales into down_proj's input (AWQ, SmoothQuant: the fold does not commute with the
Hadamard), a down_proj with a bias, and intermediate sizes with no power-of-two factor > 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ModelError, RecipeError
from ..graph.model import ModelGraph
from ..graph.names import CheckpointNames
from ..scheme import Scheme
from .hadamard import hadamard

SCHEME_NAME = "R4"
TARGET = r"re:.*mlp\.down_proj$"
HADACORE_MAX = 1 << 15  # vLLM's hadacore kernel: powers of two up to 2^15
_FIELD = "quantization.online_down_proj"


def block_size(n: int) -> int:
    """The Hadamard block vLLM's kernel can apply to ``n`` channels: the largest power of two
    dividing ``n``, at most 2¹⁵."""
    return min(n & -n, HADACORE_MAX)


def normalized_block(block: int) -> torch.Tensor:
    """``H_b/√b`` (float64), ``H_b`` the Sylvester matrix (symmetric, so ``H_bᵀ = H_b``)."""
    return hadamard(block) / block ** 0.5


def online_hadamard(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """What vLLM applies to down_proj's input: ``x·h`` on each block of ``h.shape[0]`` channels,
    computed in ``h``'s dtype (float32 at least: bf16 would round the 1/√b of every entry)."""
    return (x.to(h.dtype).unflatten(-1, (-1, h.shape[0])) @ h).flatten(-2).to(x.dtype)


@torch.no_grad()
def fuse_into_weight(weight: torch.Tensor, block: int) -> None:
    """``W ← W·Hₙ`` in place (float64): ``(x·Hₙ)(W·Hₙ)ᵀ = x·Wᵀ`` since ``Hₙ`` is orthogonal."""
    h = normalized_block(block).to(weight.device)
    weight.copy_(online_hadamard(weight.to(torch.float64), h).to(weight.dtype))


def transform_config(block: int) -> dict:
    """compressed-tensors' ``TransformConfig`` as ``quantization_config.transform_config``."""
    return {"config_groups": {SCHEME_NAME: {
        "type": "hadamard",
        "apply": [{"targets": [TARGET], "location": "input", "inverse": False, "ignore": []}],
        "randomize": False, "requires_grad": False, "head_dim": block, "precision": "float32"}}}


def down_projs(graph: ModelGraph, names: CheckpointNames) -> dict[int, str]:
    """Per layer, the down_proj (name inside the layer) that ``TARGET`` matches in the checkpoint's
    names; layers without one (MoE experts only) are absent."""
    pattern = re.compile(TARGET[3:])
    out: dict[int, str] = {}
    for i in range(len(graph.kinds)):
        prefix = graph.layer_prefix(i)
        for unit in graph.layer(i).units:
            if pattern.match(names.source_module(prefix + unit.name)):
                out[i] = unit.name
    return out


def check_online_down_proj(graph: ModelGraph, names: CheckpointNames, schemes: Iterable[Scheme],
                           format_name: str, where: str) -> int:
    """The block size, or the one-line refusal of what vLLM would not apply exactly. Reads no weight."""
    if format_name != "compressed-tensors":
        raise RecipeError(f"{where}: {_FIELD}: vLLM reads the online Hadamard only from a compressed-tensors "
                          f"transform_config, not from the {format_name} format", field=_FIELD, value=True,
                          hint="export.format: compressed-tensors, or online_down_proj: false")
    if any(s.input_activations is not None and s.input_activations.type == "float"
           and s.input_activations.num_bits == 4 for s in schemes):
        raise RecipeError(f"{where}: {_FIELD}: FP4 activations take vLLM's QUTLASS transform path, which quantkit "
                          "has not checked", field=_FIELD, value=True, hint="online_down_proj: false")
    found = down_projs(graph, names)

    def refuse(why: str) -> None:
        raise ModelError(f"{where}: {_FIELD}: {why}", field=_FIELD, value=True, hint="online_down_proj: false")

    if not found:
        refuse("no decoder layer has a dense MLP Linear named mlp.down_proj (vLLM transforms no fused MoE experts)")
    blocks = set()
    for i, name in found.items():
        unit = graph.layer(i).unit(name)
        if unit.bias or unit.fused:
            refuse(f"{graph.layer_prefix(i)}{name} has a bias or is fused; vLLM's transformed Linear takes neither")
        if block_size(unit.in_features) < 2:
            refuse(f"{graph.layer_prefix(i)}{name} reads {unit.in_features} channels, an odd number: "
                   "vLLM's Hadamard kernel needs a power-of-two block")
        blocks.add(block_size(unit.in_features))
    if len(blocks) != 1:
        refuse(f"down_proj input sizes need different Hadamard blocks {sorted(blocks)}; one transform_config "
               "scheme has one head_dim")
    return blocks.pop()


class DownProjHadamard:
    """The ``WeightEdit`` that fuses ``Hₙ`` into each matched down_proj's weight as its layer is
    loaded and hooks the same ``Hₙ`` onto its input, so calibration and evaluation see the model
    vLLM will run; export adds the ``transform_config`` and the per-Linear transform tensor."""

    modules: tuple[str, ...] = ()

    def __init__(self, graph: ModelGraph, names: CheckpointNames, schemes: Iterable[Scheme], format_name: str,
                 where: str):
        self.block = check_online_down_proj(graph, names, schemes, format_name, where)
        self.targets = down_projs(graph, names)

    def edit_layer(self, i: int, layer: nn.Module) -> None:
        name = self.targets.get(i)
        if name is None:
            return
        linear = layer.get_submodule(name)
        fuse_into_weight(linear.weight, self.block)
        h = normalized_block(self.block).to(device=linear.weight.device, dtype=torch.float32)
        linear.register_forward_pre_hook(lambda _m, args: (online_hadamard(args[0], h),) + tuple(args[1:]))

    def edit_module(self, name: str, module: nn.Module) -> None:
        """Nothing outside the decoder layers changes."""

    def config_updates(self) -> dict[str, object]:
        return {}

    def quantization_config_updates(self) -> dict[str, object]:
        return {"transform_config": transform_config(self.block)}

    def layer_tensors(self, i: int) -> dict[tuple[str, str], torch.Tensor]:
        """down_proj's transform tensor, the ±1 block (vLLM divides it by √b once loaded)."""
        name = self.targets.get(i)
        return {} if name is None else {(name, f"{SCHEME_NAME}_input.weight"): hadamard(self.block)}
