"""The export stage: stream the work folder's finished layers into the format's shards, and
copy every other source tensor as it is.

Runs after the engine, one layer file at a time, so memory stays bounded by one layer. Names
are the checkpoint's own (transformers' conversion mapping undone), which are the names vLLM
reads. Every source tensor that no processed layer consumed (embedding, final norm, lm_head,
vision tower, projector, MTP layers, anything) is copied byte for byte when it already has
the export dtype, else cast and checked, unless a weight edit (the stream rotation) changed
it; nothing is dropped (``check_nothing_dropped``). On a
GPU the format's packing runs there (the layer's codes go up once, packed words come back):
the formats' int64 packing arithmetic would otherwise take several times a layer's size in
host memory and most of the export time.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointWriter
from .errors import ExportError
from .graph.runtime import ModelRunner
from .scheme import QuantizedWeight
from .workdir import WorkDir


def export_checkpoint(runner: ModelRunner, workdir: WorkDir, writer: CheckpointWriter, quiet: bool) -> None:
    source, names = runner.source, runner.names
    quantized: set[str] = set()
    consumed: set[str] = set()
    for i in range(runner.num_layers):
        consumed.update(runner.layer_sources(i).values())
    edited = tuple(f"{m}." for m in runner.edited_modules())
    for src in source.weight_map:
        if src not in consumed and not names.to_model.get(src, src).startswith(edited):
            _copy_from_source(writer, runner, src)
    for name, t in runner.edited_tensors():  # a rotation's embedding, final norm and head
        writer.add(names.source_of(name), t)
    for i in tqdm(range(runner.num_layers), desc="writing shards", unit="layer", disable=quiet):
        record = workdir.load_layer(i)
        prefix = runner.layer_prefix(i)
        for name, t in record.floats.items():
            writer.add(names.source_of(prefix + name), t)
        for name, qw in record.quantized.items():
            target = names.source_module(prefix + name)
            writer.add_quantized(target, _to(qw, runner.device))
            quantized.add(target)
        for name, t in record.extra.items():
            module, _, leaf = name.rpartition(".")
            writer.add(f"{names.source_module(prefix + module)}.{leaf}", t, keep_dtype=True)
    writer.flush()
    check_nothing_dropped(runner, writer.written, quantized)


def _copy_from_source(writer: CheckpointWriter, runner: ModelRunner, src: str) -> None:
    """Byte for byte when the source already has the export dtype or is not a float (no
    cast, so nothing can overflow), else read, cast and checked by ``writer.add``."""
    path, dtype, shape, start, end = runner.source.tensor_location(src)
    if dtype == writer.export_dtype_name() or dtype not in _FLOAT_DTYPES:
        writer.add_file_range(src, dtype, shape, path, start, end)
    else:
        writer.add(src, runner.source.tensor(src))


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def check_nothing_dropped(runner: ModelRunner, written: set[str], quantized_prefixes: set[str]) -> None:
    """Every source tensor is in the output, as itself or as the tensors of a quantized
    Linear whose weight it was; raise ExportError naming the first one missing."""
    for src in runner.source.weight_map:
        if src in written:
            continue
        if src.endswith(".weight") and src[: -len(".weight")] in quantized_prefixes:
            continue
        raise ExportError(f"export: source tensor {src} was not written", file=src,
                          hint="this is a bug in quantkit; please report it with the model's config.json")


def _to(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    if device.type == "cpu":
        return qw
    moved = {f: None if getattr(qw, f) is None else getattr(qw, f).to(device, non_blocking=True)
             for f in QuantizedWeight.TENSORS}
    return replace(qw, **moved)
