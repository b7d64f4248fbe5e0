"""The recipe: everything a run needs, validated before any weight is read.

A recipe comes from YAML (``load_recipe``) or keyword arguments (``make_recipe``); both go
through the same pydantic models, so an unknown key, a wrong type or a method/format pair
that cannot work is reported with the field's dotted path, before the model is touched.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator

from . import shipped
from .errors import HubError, RecipeError
from .formats import FORMATS
from .formats.compressed_tensors import compression_format
from .quantizers import QUANTIZERS, QuantizerParams
from .scheme_names import scheme_name

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    id: str = Field(description="Hub id (org/name) or local folder with config.json and safetensors")
    revision: str | None = Field(None, description="Hub branch, tag or commit")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute/export dtype of unquantized tensors; auto = config's torch_dtype"
    )
    trust_remote_code: bool = Field(False, description="Must stay false: only architectures transformers implements run")
    allow_pickle: bool = Field(False, description="Accept .bin/.pt pickle weights (can run code)")
    fingerprint: Literal["quick", "full"] = Field(
        "quick", description="How --resume checks the weights did not change: quick = shard sizes, mtimes and "
        "headers; full = hash every byte (reads the model once more; a copied model still resumes)"
    )

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        # Accepting true and ignoring it would let a user believe a custom model ran as its
        # authors wrote it; quantkit only ever runs the classes transformers itself implements.
        if v:
            raise ValueError("quantkit never runs a model's own code, only the architectures transformers "
                             "implements; remove it or set false")
        return v


class CalibrationSpec(_Strict):
    source: str = Field(
        "shakespeare",
        description="Shipped set name (shakespeare, shakespeare-eval, quantkit-chat), 'self' (text sampled from "
        "the model), a local .jsonl/.json/.csv/.parquet/.txt file, a .safetensors file of token ids "
        "('input_ids' [n, len], used as is), or a hub dataset id",
    )
    subset: str | None = Field(None, description="Hub dataset config name")
    split: str = Field("train", description="Dataset split")
    text_column: str = Field("text", description="Column holding plain text")
    messages_column: str | None = Field(
        None, description="Column of chat messages; formatted with the tokenizer's chat template"
    )
    num_samples: int = Field(128, gt=0, description="Number of calibration sequences")
    max_seq_length: int = Field(512, gt=0, description="Tokens per sequence")
    packing: bool = Field(True, description="Concatenate texts into full-length sequences, else truncate each")
    seed: int = Field(0, description="Shuffling/sampling seed: same seed, same tokens")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass")
    all_experts: bool = Field(
        True, description="Mixture-of-Experts: every token goes through every expert for statistics while only "
        "the routed outputs propagate; false: each expert sees only the tokens routed to it")
    min_expert_tokens: int = Field(
        32, gt=0, description="Mixture-of-Experts: an expert whose statistics saw fewer tokens is quantized by "
        "round-to-nearest, with a warning naming it")

    @field_validator("source")
    @classmethod
    def _home(cls, v: str) -> str:
        return expand_home(v)


class EvaluateSpec(_Strict):
    enabled: bool = Field(True, description="Measure perplexity of base and quantized model")
    source: str = Field("shakespeare-eval", description="Text for perplexity; same forms as calibration.source")
    split: str = "train"
    text_column: str = "text"
    num_samples: int = Field(16, gt=0, description="Number of evaluation windows")
    max_seq_length: int = Field(512, gt=0, description="Tokens per window")

    @field_validator("source")
    @classmethod
    def _home(cls, v: str) -> str:
        return expand_home(v)


class ExportSpec(_Strict):
    output_dir: Path = Field(description="Folder to write; appears only when complete")
    format: str | None = Field(None, description="compressed-tensors | awq | gptq; default: the method's")
    max_shard_size: str = Field("5GB", description="Largest safetensors shard, e.g. 2GB or 500MB")
    overwrite: bool = Field(False, description="Replace an existing output_dir")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v

    @field_validator("output_dir")
    @classmethod
    def _home(cls, v: Path) -> Path:
        return v.expanduser()


class PushSpec(_Strict):
    repo_id: str = Field(description="Hub repo to create or update, org/name")
    private: bool = False
    revision: str | None = Field(None, description="Branch to push to")
    commit_message: str | None = None

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        # Checked here, not when the push starts hours later.
        from .hub import check_repo_id

        try:
            check_repo_id(v)
        except HubError as e:
            raise ValueError(str(e)) from None
        return v


class TuneSpec(_Strict):
    """After the checkpoint is written, its group scales and norm weights tuned end to end
    against the base model on the calibration windows, as ``quantkit tune`` tunes it, seeded by
    ``calibration.seed``.

    A setting left out is ``quantkit tune``'s default (``tune_settings.TuneSettings``), and is
    left out of the plan's and the retry message's command too, which show what the recipe set."""

    steps: int | None = Field(None, gt=0, description="Adam steps, a minibatch of windows each (default: "
                              "quantkit tune's)")
    lr: float | None = Field(None, gt=0, description="Adam's peak learning rate, cosine-decayed (default: "
                             "quantkit tune's)")
    batch_size: int | None = Field(None, gt=0, description="Calibration windows a step (default: quantkit tune's)")

    def settings(self) -> dict[str, int | float]:
        """The settings the recipe gives, as ``tune_folder``'s keyword arguments."""
        return self.model_dump(exclude_none=True)

    def flags(self) -> list[str]:
        """The same settings as ``quantkit tune`` options."""
        return [part for name, value in self.settings().items()
                for part in (f"--{name.replace('_', '-')}", str(value))]


def expand_home(source: str) -> str:
    """``~/...`` text sources are local files; other sources (shipped names, hub ids) stay as given."""
    return str(Path(source).expanduser()) if source.startswith("~") else source


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"'{text}' is not a size like 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class RecipeBase(_Strict):
    model: ModelSpec
    quantization: QuantizerParams
    calibration: CalibrationSpec = CalibrationSpec()
    export: ExportSpec
    evaluate: EvaluateSpec = EvaluateSpec()
    push: PushSpec | None = None
    tune: TuneSpec | None = Field(None, description="Tune the written checkpoint (quantkit tune); absent: no tuning")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    # Where the recipe came from (its file, or quantize()): errors found later name it too.
    _where: str = PrivateAttr("recipe")

    @property
    def where(self) -> str:
        return self._where

    def __eq__(self, other: object) -> bool:
        # Where a recipe came from does not make it another recipe.
        return type(other) is type(self) and self.__dict__ == other.__dict__

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return v

    @property
    def format_name(self) -> str:
        return self.export.format or QUANTIZERS[self.quantization.method].default_format


@functools.cache
def _recipe_model(methods: tuple[str, ...]) -> type[RecipeBase]:
    params = tuple(QUANTIZERS[m].Params for m in methods)
    qtype: Any = params[0] if len(params) == 1 else Annotated[Union[params], Field(discriminator="method")]
    return create_model("Recipe", __base__=RecipeBase, quantization=(qtype, ...))


def recipe_model() -> type[RecipeBase]:
    """The Recipe class for the quantizers registered now (plugins may add more)."""
    return _recipe_model(tuple(sorted(QUANTIZERS)))


Recipe = RecipeBase


def make_recipe(data: dict[str, Any], where: str = "recipe") -> RecipeBase:
    """Validate a nested dict into a Recipe, or raise RecipeError naming the field."""
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        raise _describe(e, data, where) from None
    _check_format(recipe, where)
    _check_tune(recipe, where)
    recipe._where = where
    return recipe


def load_recipe(path: str | Path) -> RecipeBase:
    """Read and validate a recipe file, or a recipe the package ships named without a path
    (``smollm2-gptq``: see ``quantkit.shipped.recipe_names()``). A file of that name wins."""
    source: Path | Traversable = Path(path).expanduser()
    if not source.is_file():
        named = shipped.recipe(str(path))
        if named is None:
            raise RecipeError(f"{path}: recipe file not found", file=str(path),
                              hint="give a recipe YAML file or a shipped recipe: " + ", ".join(shipped.recipe_names()))
        source = named
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})", file=str(path),
                          hint="save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise RecipeError(f"{path}:{at} malformed YAML ({getattr(e, 'problem', None) or e})", file=str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with model, quantization, export, ...", file=str(path),
                          value=data)
    try:
        return make_recipe(data, where=str(path))
    except RecipeError as e:
        e.file = str(path)
        raise


def _check_format(recipe: RecipeBase, where: str) -> None:
    assignment = recipe.quantization.assignment()
    for ws in (s.weights for s in assignment.schemes):
        if ws.strategy == "group" and (ws.group_size or 0) <= 0:
            raise RecipeError(f"{where}: field 'quantization.group_size': {ws.group_size} is not a group size",
                              field="quantization.group_size", value=ws.group_size,
                              hint="use -1 (one scale per output channel) or a positive group size such as 32, "
                                   "64 or 128")
    name = recipe.format_name
    if name not in FORMATS:
        raise RecipeError(f"{where}: export.format '{name}' is unknown", field="export.format", value=name,
                          hint=f"choose one of {', '.join(sorted(FORMATS))}")
    fmt = FORMATS[name]()
    if not assignment.uniform and fmt.mixed_reason():
        field = next(f for f in ("overrides", "ignore", "targets") if getattr(recipe.quantization, f, None)
                     and getattr(recipe.quantization, f) != ["Linear"])
        raise RecipeError(f"{where}: export.format '{name}' cannot store a mixed recipe: {fmt.mixed_reason()}",
                          field=f"quantization.{field}", value=getattr(recipe.quantization, field),
                          hint="use export.format: compressed-tensors")
    kv_reason = fmt.kv_cache_reason(recipe.quantization.kv_cache_scheme())
    for scheme in assignment.schemes:
        reason = fmt.unsupported_reason(scheme) or kv_reason
        if reason:
            raise RecipeError(f"{where}: export.format '{name}' cannot store quantization.method "
                              f"'{recipe.quantization.method}' as configured: {reason}", field="export.format",
                              value=name)


def _check_tune(recipe: RecipeBase, where: str) -> None:
    """``tune:`` only where ``quantkit tune`` will accept the checkpoint the run writes (the
    conditions of ``scale_tuning.packed_bits``) and can re-read the run's text (report.json
    records its fields; not text the model generated), so a run that asks for it does not find
    out after hours of quantizing."""
    if recipe.tune is None:
        return
    params = recipe.quantization
    schemes = params.assignment().schemes

    def refuse(problem: str, hint: str, value: Any = None) -> RecipeError:
        return RecipeError(f"{where}: field 'tune': {problem}", field="tune", value=value, hint=hint)

    if recipe.format_name != "compressed-tensors":
        raise refuse(f"tune rewrites compressed-tensors checkpoints, not export.format '{recipe.format_name}'",
                     "set export.format: compressed-tensors, or remove tune", recipe.format_name)
    if len(schemes) > 1:
        raise refuse(f"tune handles one scheme; this recipe quantizes with {len(schemes)} "
                     f"({', '.join(scheme_name(s) for s in schemes)})", "quantize with one scheme, or remove tune",
                     [scheme_name(s) for s in schemes])
    if schemes[0].input_activations is not None or compression_format(schemes[0]) != "pack-quantized":
        raise refuse(f"tune handles weight-only int4/int8 schemes (W4A16, W8A16), not {scheme_name(schemes[0])}",
                     "quantize weights only (e.g. scheme: W4A16), or remove tune", scheme_name(schemes[0]))
    if params.online_down_proj:
        raise refuse("tune trains the model without the Hadamard vLLM applies online to down_proj's input "
                     "(quantization.online_down_proj)", "remove quantization.online_down_proj, or remove tune", True)
    if recipe.calibration.source == "self":
        raise refuse("tune re-reads the calibration windows, and text the model generated "
                     "(calibration.source 'self') is not generated again", "use a text calibration.source, or remove tune",
                     "self")


def _describe(e: ValidationError, data: dict[str, Any], where: str) -> RecipeError:
    """The first error, naming the dotted field path and what is wrong, with a 'did you mean'."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if loc[:1] == ["quantization"] and len(loc) > 1 and loc[1] in QUANTIZERS:
        loc.pop(1)  # the discriminator tag pydantic inserts is not a field the user wrote
    field = ".".join(loc) or "(top level)"
    methods = ", ".join(sorted(QUANTIZERS))
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        close, known = _did_you_mean(loc, data)
        return RecipeError(f"{where}: unknown field '{field}'", field=field, value=value,
                           hint=f"did you mean '{close}'?" if close else f"expected one of {', '.join(known)}")
    if err["type"] == "union_tag_invalid":
        method = value.get("method") if isinstance(value, dict) else None
        close = difflib.get_close_matches(str(method), QUANTIZERS, n=1)
        return RecipeError(f"{where}: quantization.method '{method}' is unknown", field="quantization.method",
                           value=method,
                           hint=f"choose one of {methods}" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if err["type"] == "union_tag_not_found":
        return RecipeError(f"{where}: missing required field 'quantization.method'", field="quantization.method",
                           hint=f"choose one of {methods}")
    if err["type"] == "missing":
        return RecipeError(f"{where}: missing required field '{field}'", field=field)
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = "should be a mapping of its own fields"
    elif err["type"] == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
    else:
        msg = err["msg"]
    got = repr(value)
    return RecipeError(f"{where}: field '{field}': {msg} (got {got if len(got) <= 60 else got[:57] + '...'})",
                       field=field, value=value)


def _did_you_mean(loc: list[str], data: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The closest known field to the unknown one at ``loc`` (dotted), and the known fields there."""
    model: type[BaseModel] = recipe_model()
    node: Any = data
    for part in loc[:-1]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if part == "quantization" and isinstance(node, dict) and node.get("method") in QUANTIZERS:
            model = QUANTIZERS[node["method"]].Params
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            for arg in getattr(ann, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    model = arg
    known = [f.alias or n for n, f in model.model_fields.items()]
    hit = difflib.get_close_matches(loc[-1], known, n=1)
    return (".".join(loc[:-1] + hit) if hit else None), known


def recipe_fields_help() -> str:
    """Every recipe field with its description: the epilog of ``run --help``."""
    lines = []
    sections = {"model": ModelSpec, "calibration": CalibrationSpec, "export": ExportSpec,
                "evaluate": EvaluateSpec, "push": PushSpec, "tune": TuneSpec}
    for section, model in sections.items():
        lines.append(f"{section}:")
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else f"default {f.default!r}"
            lines.append(f"  {name} ({default}): {f.description or ''}")
    lines.append("quantization (method-specific):")
    for method in sorted(QUANTIZERS):
        fields = QUANTIZERS[method].Params.model_fields
        opts = ", ".join(f"{n}={f.default!r}" for n, f in fields.items() if n != "method")
        lines.append(f"  method: {method}  [{opts}]")
    lines.append("device: auto | cpu | cuda | cuda:N (default auto)")
    return "\n".join(lines)
