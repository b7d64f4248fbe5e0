"""The export stage: stream the work folder's finished layers into the format's shards.

Runs after the engine, one layer file at a time, so memory stays bounded by one layer and
the embedding/lm_head, which are copied from the source shards as they are. On a GPU the
format's packing runs there (the layer's codes go up once, packed words come back): the
formats' int64 packing arithmetic would otherwise take several times a layer's size in host
memory and most of the export time.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointWriter
from .layers import ModelSkeleton
from .scheme import QuantizedWeight
from .workdir import WorkDir


def export_checkpoint(skeleton: ModelSkeleton, workdir: WorkDir, writer: CheckpointWriter, quiet: bool) -> None:
    arch, source = skeleton.arch, skeleton.source
    _copy_from_source(writer, skeleton, arch.embed + ".weight", arch.embed + ".weight")
    for i in tqdm(range(skeleton.num_layers), desc="writing shards", unit="layer", disable=quiet):
        record = workdir.load_layer(i)
        prefix = skeleton.layer_prefix(i)
        for name, t in record.floats.items():
            writer.add(prefix + name, t)
        for name, qw in record.quantized.items():
            writer.add_quantized(prefix + name, _to(qw, skeleton.device))
        for name, t in record.extra.items():
            writer.add(prefix + name, t, keep_dtype=True)
    for name, t in source.tensors_with_prefix(arch.final_norm + ".").items():
        writer.add(f"{arch.final_norm}.{name}", t)
    if not skeleton.tied:
        _copy_from_source(writer, skeleton, skeleton.lm_head_source_name(), arch.lm_head + ".weight")
    writer.flush()


def _copy_from_source(writer: CheckpointWriter, skeleton: ModelSkeleton, src: str, dst: str) -> None:
    """Byte for byte when the source already has the export dtype (no cast, so nothing can
    overflow), else read, cast and checked by ``writer.add``."""
    path, dtype, shape, start, end = skeleton.source.tensor_location(src)
    if dtype == writer.export_dtype_name():
        writer.add_file_range(dst, dtype, shape, path, start, end)
    else:
        writer.add(dst, skeleton.source.tensor(src))


def _to(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    if device.type == "cpu":
        return qw
    moved = {f: None if getattr(qw, f) is None else getattr(qw, f).to(device, non_blocking=True)
             for f in QuantizedWeight.TENSORS}
    return replace(qw, **moved)
