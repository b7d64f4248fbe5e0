"""The one validation ``quantkit validate`` and ``pipeline.run`` share: everything that can be
checked before a weight is read, and the plan of the run it leads to.

It reads the recipe, the model's config.json and its safetensors shard headers (names, dtypes,
shapes), never a tensor's data: the model's shape, every quantized Linear's real input size
against the group size, the calibration and evaluation sources and lengths (for the sections
that run), the device, the output folder, and the disk the work files and checkpoint need.
A model on the Hub is not downloaded for this (``quantkit.model_files``). ``validate`` prints
the ``RunPlan``; ``run`` starts with it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch

from .assignment_check import resolve_assignment
from .calibration import source_kind
from .errors import ExportError, ModelError, RecipeError
from .checkpoint import work_dir_for
from .graph.types import Unit
from .graph.view import ModelView, config_from_dict, model_view
from .model_files import ModelFiles, model_files
from .output_guard import check_output_placement, check_replaceable, run_inputs
from .planner import ModelShape, get_scheme
from .qk_rows import check_qk_rows
from .quantizers import QUANTIZERS
from .recipe import RecipeBase
from .scheme import Scheme
from .scheme_names import plan_scheme_key, scheme_name
from .source_dequant import float_names
from .workdir import packs_nibbles

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class GroupCheck:
    """Linears of a decoder layer that read one input, with the sizes the shard headers give,
    checked against the group size of their scheme in ``layers`` decoder layers (all of them,
    unless some layers are shaped or quantized otherwise: those get a check of their own)."""

    linears: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]
    group_size: int | None  # None: one scale per output channel, block or tensor, or not quantized
    layers: int
    scheme: str  # the scheme's short name, or "float" where targets/ignore leave the Linears unquantized


@dataclass(frozen=True)
class TextPlan:
    """A calibration or evaluation section that will run."""

    section: str
    source: str
    kind: str  # self | shipped | tokens | file | hub (a hub dataset is only checked when loaded)
    num_samples: int
    max_seq_length: int


@dataclass(frozen=True)
class SizePlan:
    """Bytes, from the shard headers. The checkpoint figure is the planner's estimate for the
    scheme; the work files hold each quantized weight's code until export (half a byte for integer
    codes of at most 4 bits, a byte otherwise)."""

    parameters: int
    quantized_parameters: int
    shards: int
    base_bytes: int
    download_bytes: int  # the base model's shards, for a model on the Hub not downloaded yet
    checkpoint_bytes: int
    work_bytes: int
    disk_needed_bytes: int
    disk_free_bytes: int


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, validated; ``to_dict``/``to_json`` give it as plain data."""

    recipe: str
    model: str
    model_dir: str
    shape: ModelShape
    method: str
    format: str
    scheme: str
    linears: dict[str, int]  # decoder Linears per scheme name (one entry unless the recipe is mixed)
    device: str
    dtype: str
    groups: tuple[GroupCheck, ...]
    calibration: TextPlan | None
    evaluate: TextPlan | None
    tune: list[str] | None  # the written checkpoint is tuned afterwards: quantkit tune's options for it
    tune_bytes: int | None  # about the device memory that tuning holds (``tune_memory.tune_bytes``)
    output_dir: str
    overwrite: bool
    sizes: SizePlan

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """The plan as ``quantkit validate`` prints it."""
        s, z = self.shape, self.sizes
        lines = [
            f"{self.recipe}: valid",
            f"model        {self.model} ({self.model_dir})",
            f"             {s.architecture}, {s.num_layers} layers, hidden {s.hidden_size}, intermediate "
            f"{s.intermediate_size}, {s.num_heads} heads ({s.num_kv_heads} KV) x {s.head_dim}, vocab {s.vocab_size}, "
            f"context {s.max_position_embeddings}",
            f"             {z.parameters / 1e6:.1f} M parameters ({z.quantized_parameters / 1e6:.1f} M quantized) in "
            f"{z.shards} shard{'s' if z.shards != 1 else ''}, {_mb(z.base_bytes)}",
            f"quantize     {self.method} -> {self.scheme}, {self.format} format, on {self.device}, "
            f"unquantized tensors in {self.dtype}",
        ]
        mixed = len(self.groups) and {g.scheme for g in self.groups} != {self.scheme}
        if mixed:
            lines.append(f"{'':<13}mixed: " + ", ".join(f"{name} on {n} Linears" for name, n in self.linears.items()))
        for i, g in enumerate(self.groups):
            grouping = (f"group {g.group_size} divides it" if g.group_size else
                        "not quantized" if g.scheme == "float" else "no groups")
            lines.append(f"{'groups' if i == 0 else '':<13}{', '.join(g.linears)}: in {g.in_features}, "
                         f"out {'/'.join(map(str, g.out_features))}; {grouping}"
                         f"{f' ({g.scheme})' if mixed and g.scheme != 'float' else ''} ({g.layers} layers)")
        for text in (self.calibration, self.evaluate):
            if text is not None:
                lines.append(f"{text.section:<13}{text.source} ({text.kind}): {text.num_samples} x "
                             f"{text.max_seq_length} tokens")
        if self.tune is not None:
            lines.append(f"{'tune':<13}then `{' '.join(['quantkit tune', self.output_dir, *self.tune])}` on it, "
                         f"holding about {_mb(self.tune_bytes or 0)} on {self.device}")
        lines += [
            f"output       {self.output_dir}" + (" (replaced if it exists)" if self.overwrite else ""),
            f"disk         checkpoint about {_mb(z.checkpoint_bytes)} + work files {_mb(z.work_bytes)} = "
            f"{_mb(z.disk_needed_bytes)} needed, {_mb(z.disk_free_bytes)} free",
        ]
        if z.download_bytes:
            lines.append(f"download     {_mb(z.download_bytes)} of shards into the Hugging Face cache")
        return "\n".join(lines)


def check(recipe: RecipeBase) -> RunPlan:
    """Validate ``recipe`` against its model and machine; raise the first problem as a
    ``QuantkitError`` naming it, else return the plan. Reads no weight."""
    return check_run(recipe)[0]


def check_run(recipe: RecipeBase) -> tuple[RunPlan, ModelView]:
    """``check``, and the model's meta skeleton, layer graph and names it validated, built in
    the dtype the run computes in: ``ModelRunner`` takes them over instead of building them
    again (once per run: the runner edits the skeleton)."""
    where = recipe.where
    model = model_files(recipe.model.id, recipe.model.revision, recipe.model.allow_pickle, os.environ.get("HF_TOKEN"))
    shape = ModelShape.from_config(model.config, where=f"{model.location}/config.json")
    params = recipe.quantization
    scheme = params.scheme()
    device = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.model.dtype, model.config)
    named = f"model {recipe.model.id}"
    config_file = f"{model.location}/config.json"
    view = model_view(config_from_dict(model.config, config_file, named), model.config,
                      float_names(model.headers, model.config.get("quantization_config")),
                      compute_dtype(device, dtype), config_file, named)
    view.check_supported(named)
    untied = 0  # elements of a head the rotation unties from the embedding: new in the checkpoint
    if params.rotate == "hadamard":
        from .rotation.stream import rotation_targets

        if rotation_targets(view.model, view.graph, view.location, named).untie:
            untied = view.model.get_input_embeddings().weight.numel()
    linear_schemes = resolve_assignment(params.assignment(), view.graph, where)
    if params.online_down_proj:
        from .rotation.online import check_online_down_proj

        check_online_down_proj(view.graph, view.names, linear_schemes.values(), recipe.format_name, named)
    check_qk_rows(view.model.config.get_text_config().model_type, linear_schemes, recipe.format_name, where)
    groups = check_groups(view, linear_schemes, where)
    check_linear_tensors(view, model.headers)
    quantizer = QUANTIZERS[params.method](params, model.config)
    cal, ev = recipe.calibration, recipe.evaluate
    # Tuning reads the calibration windows after the run even where the quantizer does not.
    texts = [("calibration", cal) if quantizer.needs_calibration or recipe.tune is not None else None,
             ("evaluate", ev) if ev.enabled else None]
    calibration, evaluate = (None if t is None else _text_plan(*t, shape) for t in texts)
    output_dir = Path(recipe.export.output_dir)
    if not model.remote:
        shards = sorted(Path(model.location).glob("*.safetensors"))
        check_output_placement(output_dir, work_dir_for(output_dir),
                               run_inputs(Path(model.location), shards, text_sources(recipe)))
    check_replaceable(output_dir, recipe.export.overwrite)
    sizes = _sizes(model, view, linear_schemes, dtype, output_dir, untied)
    linears: dict[str, int] = {}
    for s, n in Counter(linear_schemes.values()).items():  # named once per scheme, not per Linear
        linears[scheme_name(s)] = linears.get(scheme_name(s), 0) + n
    return RunPlan(
        recipe=where, model=recipe.model.id, model_dir=model.location, shape=shape, method=params.method,
        format=recipe.format_name, scheme=scheme_name(scheme), linears=linears, device=str(device),
        dtype=str(dtype).replace("torch.", ""), groups=groups, calibration=calibration, evaluate=evaluate,
        tune=None if recipe.tune is None else recipe.tune.flags(),
        tune_bytes=None if recipe.tune is None else _tune_bytes(recipe, shape, sizes, scheme, device, model.config),
        output_dir=str(output_dir), overwrite=recipe.export.overwrite, sizes=sizes,
    ), view


def _tune_bytes(recipe: RecipeBase, shape: ModelShape, sizes: SizePlan, scheme: Scheme, device: torch.device,
                config: dict[str, Any]) -> int:
    """About the memory tuning will hold on ``device``; refused on a GPU it exceeds, before
    the run spends its time (on the CPU the host's swap and other processes decide)."""
    from .tune_memory import products_dtype, teacher_dtype, tune_bytes
    from .tune_settings import TuneSettings

    ws = scheme.weights
    group = _group_size(scheme) or shape.hidden_size  # per-channel scales: about one per row
    windows = recipe.tune.batch_size or TuneSettings.batch_size
    need = tune_bytes(sizes.parameters, sizes.quantized_parameters, sizes.quantized_parameters // group, ws.num_bits,
                      teacher_dtype(device, resolve_dtype("auto", config)).itemsize, shape.num_layers,
                      shape.hidden_size + shape.intermediate_size, shape.vocab_size,
                      windows * recipe.calibration.max_seq_length, products_dtype(device))
    if device.type == "cuda":
        check_tune_fits(need, torch.cuda.mem_get_info(device)[1], str(device), windows, recipe.where)
    return need


def check_tune_fits(need: int, total: int, device: str, windows: int, where: str) -> None:
    """Refuse a tuning estimated above the device's whole memory: it would fail after the run."""
    if need > total:
        raise RecipeError(f"{where}: field 'tune': tuning would hold about {need / 1e9:.0f} GB on {device}, which has "
                          f"{total / 1e9:.0f} GB (the base and the quantized model together, and {windows} "
                          "calibration windows a step)", field="tune", value=need,
                          hint="lower tune.batch_size, or run with --no-tune and then `quantkit tune OUTPUT_DIR "
                               "--device cpu`")


def text_sources(recipe: RecipeBase) -> dict[str, str]:
    """The text sources the recipe names, by recipe field (protected from the output even where unused)."""
    return {"calibration.source": recipe.calibration.source, "evaluate.source": recipe.evaluate.source}


def resolve_device(name: str, field: str = "device") -> torch.device:
    """The recipe's ``device`` (or a command's ``field``, e.g. ``--device``) as a torch device,
    or a `RecipeError` naming ``field`` and saying what exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setting = field if field.startswith("--") else f"{field}:"  # a flag, or a recipe key as YAML writes it
    hint = f"use {setting} auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecipeError(f"{field}: '{name}' is not a device", field=field, value=name, hint=hint) from None
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"{field}: '{name}' is not supported", field=field, value=name, hint=hint)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{field}: '{name}' asked for but CUDA is not available", field=field, value=name,
                          hint=f"use {setting} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RecipeError(f"{field}: '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)",
                          field=field, value=name, hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a run computes in on ``device`` (it exports in ``dtype``): CPUs here run bf16
    matmuls ~8x slower than fp32."""
    return torch.float32 if device.type == "cpu" else dtype


def resolve_dtype(name: str, config: dict[str, Any]) -> torch.dtype:
    if name == "auto":
        name = str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    return DTYPES.get(name, torch.float32)


def check_groups(view: ModelView, linear_schemes: dict[str, Scheme], where: str) -> tuple[GroupCheck, ...]:
    """Every decoder Linear's ``[out, in]`` as the model's own modules have it (one check per
    input group of each decoder-layer type and scheme); the group size of its scheme
    (``linear_schemes``, by full name; absent: not quantized) must divide each ``in``."""
    graph = view.graph
    checks, classes = [], []
    for t, layer in enumerate(graph.types):
        for g in layer.groups:
            units = [layer.unit(n) for n in g.linears]
            counts: dict[Scheme | None, int] = {}
            for i in graph.layers_of(t):
                scheme = linear_schemes.get(graph.layer_prefix(i) + g.key)
                counts[scheme] = counts.get(scheme, 0) + 1
            checks += [GroupCheck(g.linears, units[0].in_features, tuple(u.out_features for u in units),
                                  _group_size(scheme), n, "float" if scheme is None else scheme_name(scheme))
                       for scheme, n in counts.items()]
            classes += [layer.layer_class] * len(counts)
    bad = [(c, cls) for c, cls in zip(checks, classes) if c.group_size and c.in_features % c.group_size]
    if bad:
        (c, cls), sizes = bad[0], {c.in_features for c in checks if c.group_size}
        fits = [s for s in _GROUP_SIZES if all(d % s == 0 for d in sizes)] or [-1]
        raise RecipeError(
            f"{where}: quantization.group_size {c.group_size} does not divide the input size "
            f"{c.in_features} of {c.linears[0]} ({cls})", field="quantization.group_size",
            value=c.group_size, hint=f"use one of {fits}")
    return tuple(checks)


def _group_size(scheme: Scheme | None) -> int | None:
    """Input columns per scale of a grouped scheme (tensor groups too), else None."""
    if scheme is None or scheme.weights.layout.kind != "group":
        return None
    return scheme.weights.group_size


def check_linear_tensors(view: ModelView, headers: dict[str, dict[str, Any]]) -> None:
    """Every Linear the layers quantize is in the shard headers with the shape the config
    implies: a missing or reshaped one stops here, before any weight is read."""
    for prefix, u, name in _decoder_units(view):
        if u.expert is None and u.rows is None and not view.names.held_fused(prefix + u.name):
            entry = headers.get(name)
            if entry is None:
                raise ModelError(f"model: tensor {name} is missing from the shards", field="model.id",
                                 value=name, hint="the checkpoint does not match its config; re-download or "
                                 "re-convert it")
            if list(entry["shape"]) != [u.out_features, u.in_features]:
                raise ModelError(f"model: tensor {name} has shape {list(entry['shape'])}, the config implies "
                                 f"{[u.out_features, u.in_features]}", field="model.id", value=name,
                                 hint="the checkpoint does not match its config")


def _decoder_units(view: ModelView) -> Iterator[tuple[str, Unit, str]]:
    """Every unit of every decoder layer: the layer's prefix, the unit, and the checkpoint name
    of the tensor that holds it."""
    graph = view.graph
    for i in range(view.location.num_layers):
        prefix = graph.layer_prefix(i)
        for u in graph.layer(i).units:
            yield prefix, u, view.names.source_of(prefix + u.param)


def _text_plan(section: str, spec: Any, shape: ModelShape) -> TextPlan:
    if spec.max_seq_length > shape.max_position_embeddings:
        raise RecipeError(f"recipe: {section}.max_seq_length {spec.max_seq_length} exceeds the model's "
                          f"max_position_embeddings ({shape.max_position_embeddings})",
                          field=f"{section}.max_seq_length", value=spec.max_seq_length)
    return TextPlan(section, spec.source, source_kind(spec.source, section), spec.num_samples, spec.max_seq_length)


def _sizes(model: ModelFiles, view: ModelView, linear_schemes: dict[str, Scheme], dtype: torch.dtype,
           output_dir: Path, untied: int) -> SizePlan:
    """Refuse to start when the work files plus the checkpoint cannot fit on the output's disk
    (``untied``: elements of a head written anew beside the embedding it was tied to)."""
    headers = model.headers
    precisions = {s: get_scheme(plan_scheme_key(s), _group_size(s)) for s in set(linear_schemes.values())}
    linears, code_bytes = {}, {}
    for prefix, u, source in _decoder_units(view):
        scheme = linear_schemes.get(prefix + u.name)
        if scheme is not None and source in headers:
            linears[source] = precisions[scheme]
            code_bytes[source] = 0.5 if packs_nibbles(scheme.weights) else 1.0
    numel = {name: math.prod(h["shape"]) for name, h in headers.items()}
    element = _DTYPE_BYTES[str(dtype).replace("torch.", "")]
    checkpoint = sum(linears[n].linear_bytes(*headers[n]["shape"]) if n in linears else numel[n] * element
                     for n in headers) + untied * element
    work = int(sum(numel[n] * code_bytes[n] for n in linears))
    target = output_dir.resolve().parent
    while not target.exists():
        target = target.parent
    free = shutil.disk_usage(target).free
    sizes = SizePlan(
        parameters=sum(numel.values()), quantized_parameters=sum(numel[n] for n in linears), shards=model.shards,
        base_bytes=model.shard_bytes,
        download_bytes=model.shard_bytes if model.remote else 0, checkpoint_bytes=checkpoint, work_bytes=work,
        disk_needed_bytes=checkpoint + work, disk_free_bytes=free)
    if free < sizes.disk_needed_bytes:
        raise ExportError(f"export.output_dir {output_dir}: {free / 1e9:.1f} GB free on its disk, about "
                          f"{sizes.disk_needed_bytes / 1e9:.1f} GB needed (work files + checkpoint)",
                          field="export.output_dir", value=str(output_dir), file=output_dir,
                          hint="free space or choose another folder")
    return sizes


def _plain(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, all the way down: what JSON gives back."""
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
