"""The export stage: each finished layer into the format's shards as the engine hands it
over, and every other source tensor copied as it is.

``StreamingExport`` runs in a background thread beside the engine: first it copies the source
tensors no layer consumes, then each layer the engine hands over (``hand_off``: the record
still in memory, its codes still on the device; a layer replayed on ``--resume``, its
work-folder record), while the engine computes the next layer; ``finish`` writes what only
exists after the last layer. One layer is exported at a time and the next hand-off waits for
it, so at most one finished layer waits for the export. Exporting after the engine instead
read every layer back from the work folder, copied its codes to the GPU again, and kept the GPU
idle meanwhile: 3-7.5 s of a 2- or 4-layer MoE run on an H200.

Names are the checkpoint's own (transformers' conversion mapping undone), which are the names
vLLM reads. Every source tensor that no processed layer consumed (embedding, final norm,
lm_head, vision tower, projector, MTP layers, anything) is copied byte for byte when it already
has the export dtype, else cast and checked, unless a weight edit (the stream rotation) changed
it; nothing is dropped (``check_nothing_dropped``). On a GPU the format's packing runs there,
on a stream of its own so it overlaps the engine's work, and packed words come back. Linears
of one scheme and shape (a MoE layer's hundreds of experts) are packed and checked as stacks
(``stack_chunks``): per-Linear packing paid a dozen small ops and several host syncs per
expert, most of a MoE export's time on a GPU.

The tensors' order in the shards (untouched source tensors, the layers in order, a rotation's
edited tensors) is the same for a fresh run and a resumed one, so both write the same bytes.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Callable

import torch

from .background import OneInFlight
from .checkpoint import CheckpointWriter
from .errors import ExportError
from .formats.base import Format
from .graph.runtime import ModelRunner
from .scheme import QuantizedWeight
from .workdir import LayerRecord


class StreamingExport:
    """The export of one run on the writing rank, beside the engine: ``start``, then
    ``hand_off`` per layer in order, then ``finish``; ``close`` in a ``finally`` (it joins the
    thread; after a failure it lets the job under way stop at its next Linear).

    An export error is raised by the next ``hand_off`` or by ``finish``, so it stops the run
    with its own message."""

    def __init__(self, runner: ModelRunner, writer: CheckpointWriter):
        self.runner, self.writer = runner, writer
        self.quantized: set[str] = set()
        self._worker = OneInFlight("quantkit-export")
        self._stop = threading.Event()

    def start(self) -> None:
        """Open the staging folder and copy the untouched source tensors in the background."""
        self.writer.start()
        self._worker.submit(copy_untouched_sources, self.runner, self.writer)

    def hand_off(self, i: int, record: LayerRecord) -> None:
        """Export layer ``i`` (its tensors are not changed afterwards) once layer ``i - 1``'s is
        written; its device work follows the record's last kernels on the engine's stream."""
        self._worker.submit(self._layer, i, record)

    def _layer(self, i: int, record: LayerRecord) -> None:
        self.quantized |= export_layer(self.runner, self.writer, i, record, self._stop.is_set)

    def finish(self) -> None:
        """After the last hand-off: wait for its export, write a rotation's edited tensors,
        close the last shard and check that every source tensor is in the output."""
        self._worker.wait()
        finish_export(self.runner, self.writer, self.quantized)

    def close(self) -> None:
        self._stop.set()
        self._worker.close()


def copy_untouched_sources(runner: ModelRunner, writer: CheckpointWriter) -> None:
    """Every source tensor that no layer consumes and no edit changes, as it is."""
    names = runner.names
    consumed: set[str] = set()
    for i in range(runner.num_layers):
        consumed.update(runner.layer_sources(i).values())
    consumed.update(names.fused)  # written as the per-expert tensors of its experts
    edited = tuple(f"{m}." for m in runner.edited_modules())
    for src in runner.source.weight_map:
        if src not in consumed and not names.to_model.get(src, src).startswith(edited):
            _copy_from_source(writer, runner, src)


def export_layer(runner: ModelRunner, writer: CheckpointWriter, i: int, record: LayerRecord,
                 stopping: Callable[[], bool] = lambda: False) -> set[str]:
    """Write layer ``i``'s tensors from its record; return the checkpoint prefixes of its
    quantized Linears. ``stopping()`` true (the run failed) ends it early, between Linears."""
    names = runner.names
    prefix = runner.layer_prefix(i)
    quantized: set[str] = set()
    # Floats and extra tensors in name order, as a record read back from the work folder holds
    # them (safetensors sorts its keys; the quantized Linears keep their order there), so a
    # resumed run, whose replayed layers come from there, writes the same bytes.
    for name in sorted(record.floats):
        writer.add(names.source_of(prefix + name), record.floats[name])
    targets = {name: names.source_module(prefix + name) for name in record.quantized}
    chunks = stack_chunks(record.quantized, writer.fmt)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, qw in record.quantized.items():
        if stopping():
            return quantized
        if name in chunks and name not in packed:
            chunk = chunks[name]
            qws = [record.quantized[n] for n in chunk]
            tensors = writer.pack_stack([targets[n] for n in chunk], qws, _stack(qws, runner.device))
            packed.update(zip(chunk, tensors))
        if name in packed:
            writer.add_packed(packed.pop(name))
        else:
            writer.add_quantized(targets[name], _to(qw, runner.device))
        quantized.add(targets[name])
    for name in sorted(record.extra):
        module, _, leaf = name.rpartition(".")
        writer.add(f"{names.source_module(prefix + module)}.{leaf}", record.extra[name], keep_dtype=True)
    for edit in runner.edits:  # the online Hadamard's transform tensor
        for (module, leaf), t in edit.layer_tensors(i).items():
            writer.add(f"{names.source_module(prefix + module)}.{leaf}", t)
    return quantized


def finish_export(runner: ModelRunner, writer: CheckpointWriter, quantized: set[str]) -> None:
    """What follows the last layer: a rotation's edited tensors (its embedding, final norm and
    head), the last shard closed, and the check that nothing was dropped."""
    for name, t in runner.edited_tensors():
        writer.add(runner.names.source_of(name), t)
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
        if src in runner.names.fused:
            missing = [t for t in runner.names.per_expert(src) if t not in written
                       and not (t.endswith(".weight") and t.rpartition(".")[0] in quantized_prefixes)]
            if not missing:
                continue
            src = f"{src} (as {missing[0]})"
        if src.endswith(".weight") and src[: -len(".weight")] in quantized_prefixes:
            continue
        raise ExportError(f"export: source tensor {src} was not written", file=src,
                          hint="this is a bug in quantkit; please report it with the model's config.json")


STACK_BYTES = 64 << 20
"""Codes packed as one stack at most: the int32 packing needs about five times that where it
runs (the host, on a CPU run) and the packed result waits on the host until its Linears are
written; 64 MiB is already a stack of ~40 of Qwen3-30B-A3B's experts (a dozen stacks a layer
instead of 384 Linears)."""

_UNSTACKED = ("g_idx", "input_scale", "global_scale", "input_global_scale")


def stack_chunks(quantized: dict[str, QuantizedWeight], fmt: Format) -> dict[str, list[str]]:
    """Each Linear that packs together with others -> the names of its stack, in record order:
    Linears of one scheme and shape with only codes, scales and zero points (a layer's experts,
    a dense MLP's gate and up), at most ``STACK_BYTES`` of codes a stack."""
    groups: dict[tuple, list[list[str]]] = {}
    for name, qw in quantized.items():
        if any(getattr(qw, f) is not None for f in _UNSTACKED) or not fmt.stacks(qw.scheme):
            continue
        key = (qw.scheme, qw.codes.shape, qw.codes.dtype, qw.scale.shape, qw.scale.dtype, qw.zero_point is None)
        chunks = groups.setdefault(key, [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * qw.codes.numel() * qw.codes.element_size() > STACK_BYTES:
            chunks.append([])
        chunks[-1].append(name)
    return {name: chunk for chunks in groups.values() for chunk in chunks if len(chunk) > 1 for name in chunk}


def _stack(qws: list[QuantizedWeight], device: torch.device) -> QuantizedWeight:
    """One QuantizedWeight whose tensors hold ``qws``'s along a leading dim, on ``device`` (one
    copy up for the whole stack)."""
    first = qws[0]
    zero = None if first.zero_point is None else torch.stack([q.zero_point for q in qws]).to(device)
    return QuantizedWeight(codes=torch.stack([q.codes for q in qws]).to(device),
                           scale=torch.stack([q.scale for q in qws]).to(device), zero_point=zero, scheme=first.scheme)


def _to(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    if device.type == "cpu":
        return qw
    moved = {f: None if getattr(qw, f) is None else getattr(qw, f).to(device, non_blocking=True)
             for f in QuantizedWeight.TENSORS}
    return replace(qw, **moved)
