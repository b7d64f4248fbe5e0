"""The export stage: stream the work folder's finished layers into the format's shards.

Runs after the engine, one layer file at a time, so memory stays bounded by one layer and
the embedding/lm_head, which are copied from the source shards as they are.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .checkpoint import CheckpointWriter
from .layers import ModelSkeleton
from .workdir import WorkDir


def export_checkpoint(skeleton: ModelSkeleton, workdir: WorkDir, writer: CheckpointWriter, quiet: bool) -> None:
    arch, source = skeleton.arch, skeleton.source
    writer.add(arch.embed + ".weight", skeleton.embed_weight())
    for i in tqdm(range(skeleton.num_layers), desc="writing shards", unit="layer", disable=quiet):
        record = workdir.load_layer(i)
        prefix = skeleton.layer_prefix(i)
        for name, t in record.floats.items():
            writer.add(prefix + name, t)
        for name, qw in record.quantized.items():
            writer.add_quantized(prefix + name, qw)
        for name, t in record.extra.items():
            writer.add(prefix + name, t, keep_dtype=True)
    for name, t in source.tensors_with_prefix(arch.final_norm + ".").items():
        writer.add(f"{arch.final_norm}.{name}", t)
    if not skeleton.tied:
        writer.add(arch.lm_head + ".weight", skeleton.lm_head_weight())
    writer.flush()
