"""Property tests: the recipe loader over random recipes, and the quantize/pack numerics over
random shapes and schemes. Bounded (a few dozen examples each) to stay a few seconds on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from quantkit.errors import RecipeError
from quantkit.formats import FORMATS
from quantkit.formats.packing import (
    pack_awq,
    pack_int32,
    to_signed,
    unpack_awq,
    unpack_int32,
)
from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.rtn import quantize_rtn
from quantkit.recipe import CalibrationSpec, EvaluateSpec, ExportSpec, ModelSpec, load_recipe
from quantkit.scheme import FP8_DTYPE, FP8_MAX, Scheme, WeightScheme

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- recipes

# Text YAML must quote to keep a string ("yes", "1", "null", "a: b", "#x" ...).
text = st.text(st.characters(categories=["L", "N"]) | st.sampled_from(list("-_./: #'\"!&*")), min_size=1, max_size=20)
group = st.sampled_from([-1, 32, 64, 128])
repo_id = st.from_regex(r"([a-z0-9]{1,10}/)?[a-zA-Z0-9]([a-zA-Z0-9_]{0,20}[a-zA-Z0-9])?", fullmatch=True)
unit = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True, allow_subnormal=False)


@st.composite
def quantization(draw) -> tuple[dict, list[str]]:
    """Parameters of one method, and the export formats that can store them."""
    method = draw(st.sampled_from(sorted(QUANTIZERS)))
    q: dict = {"method": method}
    if method in ("rtn", "gptq", "awq"):
        q.update(bits=draw(st.sampled_from([4, 8])), group_size=draw(group), symmetric=draw(st.booleans()))
    if method == "gptq":
        q.update(act_order=draw(st.booleans()), static_groups=draw(st.booleans()),
                 dampening_frac=draw(unit), block_size=draw(st.integers(1, 4096)))
    if method == "awq":
        q.update(grid=draw(st.integers(2, 100)), clip_search=draw(st.booleans()),
                 max_calib_tokens=draw(st.integers(16, 10**6)))
    if method == "fp8":
        q.update(weight_strategy=draw(st.sampled_from(["channel", "tensor"])),
                 activations=draw(st.sampled_from(["dynamic", "static"])), kv_cache=draw(st.booleans()))
    if method in ("dynamic_int8", "static_int8"):
        q.update(weight_method=draw(st.sampled_from(["rtn", "gptq"])),
                 smoothquant_alpha=draw(st.none() | st.floats(0.0, 1.0)), dampening_frac=draw(unit))
    if method == "static_int8":
        q.update(observer=draw(st.sampled_from(["minmax", "percentile", "mse"])),
                 percentile=draw(st.floats(0.0, 100.0, exclude_min=True)))
    # Which formats store it, decided here from the format rules, independently of the code.
    formats = []
    weight_only_int = method in ("rtn", "gptq", "awq")
    dynamic_groups = method == "gptq" and q["act_order"] and not q["static_groups"] and q["group_size"] != -1
    if not dynamic_groups:
        formats.append("compressed-tensors")
    if weight_only_int and not dynamic_groups:
        formats.append("gptq")
        if q["bits"] == 4 and not q["symmetric"] and q["group_size"] != -1 and not (method == "gptq" and q["act_order"]):
            formats.append("awq")
    if method == "fp8" and q["kv_cache"]:
        formats = ["compressed-tensors"]
    return q, formats


@st.composite
def valid_recipes(draw) -> dict:
    q, formats = draw(quantization())
    assume(formats)
    fmt = draw(st.sampled_from(formats))
    data: dict = {
        "model": {"id": draw(text), "revision": draw(st.none() | text),
                  "dtype": draw(st.sampled_from(["auto", "bfloat16", "float16", "float32"])),
                  "trust_remote_code": False, "allow_pickle": draw(st.booleans())},
        "quantization": q,
        "export": {"output_dir": "out/" + draw(st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True)),
                   "max_shard_size": f"{draw(st.integers(1, 999))}{draw(st.sampled_from(['MB', 'GB', 'KiB', 'GiB']))}",
                   "overwrite": draw(st.booleans())},
        "device": draw(st.sampled_from(["auto", "cpu", "cuda", "cuda:1"])),
    }
    if fmt != "compressed-tensors" or draw(st.booleans()):
        data["export"]["format"] = fmt
    if draw(st.booleans()):
        data["calibration"] = {
            "source": draw(text), "subset": draw(st.none() | text), "split": draw(text),
            "text_column": draw(text), "messages_column": draw(st.none() | text),
            "num_samples": draw(st.integers(1, 10**5)), "max_seq_length": draw(st.integers(1, 10**5)),
            "packing": draw(st.booleans()), "seed": draw(st.integers(-(2**31), 2**31)),
            "batch_size": draw(st.integers(1, 512)),
        }
    if draw(st.booleans()):
        data["evaluate"] = {"enabled": draw(st.booleans()), "source": draw(text),
                            "num_samples": draw(st.integers(1, 1000)), "max_seq_length": draw(st.integers(1, 8192))}
    if draw(st.booleans()):
        data["push"] = {"repo_id": draw(repo_id), "private": draw(st.booleans())}
    return data


def _write(tmp_path_factory, data) -> object:
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@SETTINGS
@given(data=valid_recipes())
def test_valid_recipes_round_trip_through_yaml(tmp_path_factory, data):
    recipe = load_recipe(_write(tmp_path_factory, data))
    dumped = recipe.model_dump(mode="json")
    for section, fields in data.items():
        if isinstance(fields, dict):
            for name, value in fields.items():
                assert dumped[section][name] == value, (section, name)
        else:
            assert dumped[section] == fields
    assert recipe.format_name == data["export"].get("format", "compressed-tensors")
    # A loaded recipe written back out loads to the same model.
    assert load_recipe(_write(tmp_path_factory, dumped)) == recipe


SECTIONS = {"model": ModelSpec, "calibration": CalibrationSpec, "export": ExportSpec, "evaluate": EvaluateSpec}
TOP = ["model", "quantization", "calibration", "export", "evaluate", "push", "device"]
# Values no scalar field accepts (pydantic's lax mode turns "yes" into True and 3 into 3.0,
# so only containers are wrong for every scalar type).
wrong_scalar = st.lists(st.integers(), min_size=1, max_size=3) | st.fixed_dictionaries({"x": st.integers()})


@st.composite
def invalid_recipes(draw) -> tuple[dict, str]:
    """A valid recipe with one mutation, and the dotted field the error must name (or an
    element of it)."""
    data = draw(valid_recipes())
    data.setdefault("calibration", {})
    data.setdefault("evaluate", {})
    kind = draw(st.sampled_from(["unknown-top", "unknown-nested", "wrong-scalar", "wrong-section"]))
    key = draw(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True))
    if kind == "unknown-top":
        assume(key not in TOP)
        data[key] = draw(st.integers() | text)
        return data, key
    section = draw(st.sampled_from([*SECTIONS, "quantization"]))
    fields = (QUANTIZERS[data["quantization"]["method"]].Params if section == "quantization"
              else SECTIONS[section]).model_fields
    if kind == "unknown-nested":
        assume(key not in fields)
        data[section][key] = draw(st.integers() | text)
        return data, f"{section}.{key}"
    if kind == "wrong-section":
        data[section] = draw(wrong_scalar.filter(lambda v: isinstance(v, list)) | st.integers() | text)
        return data, section
    name = draw(st.sampled_from(sorted(set(fields) - {"method"})))
    data[section][name] = draw(wrong_scalar)
    return data, f"{section}.{name}"


@SETTINGS
@given(case=invalid_recipes())
def test_invalid_recipes_raise_recipe_error_naming_the_field(tmp_path_factory, case):
    data, field = case
    path = _write(tmp_path_factory, data)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    # A wrong list element is named down to its index (``quantization.ignore.0``).
    assert e.value.file == str(path), message
    assert e.value.field == field or e.value.field.startswith(f"{field}."), message


# --------------------------------------------------------------------------- quantize / dequantize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def weights(draw, rows_multiple: int = 1) -> tuple[torch.Tensor, int]:
    """A random weight (six decades of scale, some of one sign, some exact zeros) and a group size dividing it."""
    g = draw(group)
    rows = rows_multiple * draw(st.integers(1, 64 // rows_multiple))
    cols = (g if g > 0 else 8) * draw(st.integers(1, 4 if g > 0 else 32))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    w = torch.randn(rows, cols, generator=gen) * 10 ** draw(st.floats(-3, 3))
    w = w + draw(st.sampled_from([0.0, 0.0, 3.0, -3.0])) * w.abs().amax()  # some rows of one sign
    w[torch.rand(rows, cols, generator=gen) < draw(st.sampled_from([0.0, 0.1, 0.5]))] = 0.0
    return w.to(draw(st.sampled_from(DTYPES))), g


def int_scheme(bits: int, g: int, symmetric: bool) -> Scheme:
    return Scheme(WeightScheme(num_bits=bits, symmetric=symmetric, strategy="channel" if g == -1 else "group",
                               group_size=None if g == -1 else g))


def per_element(t: torch.Tensor, g: int, cols: int) -> torch.Tensor:
    """Group-wise ``[rows, groups]`` parameters expanded to ``[rows, cols]``."""
    return t.to(torch.float32).repeat_interleave(cols // t.shape[1], dim=1) if g != -1 else t.to(torch.float32).expand(-1, cols)


@SETTINGS
@given(wg=weights(), bits=st.sampled_from([4, 8]), symmetric=st.booleans())
def test_int_round_trip_within_half_a_step(wg, bits, symmetric):
    w, g = wg
    qw = quantize_rtn(w, int_scheme(bits, g, symmetric))
    rows, cols = w.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert qw.codes.dtype == torch.int8 and qw.codes.shape == w.shape
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    assert qw.scale.shape == (rows, cols // g if g > 0 else 1) and qw.scale.dtype == torch.float32
    assert bool((qw.scale > 0).all())
    if symmetric:
        assert qw.zero_point is None
    else:
        assert qw.zero_point.shape == qw.scale.shape and qw.zero_point.dtype == torch.int8
        assert int(qw.zero_point.min()) >= lo and int(qw.zero_point.max()) <= hi
    ref = w.to(torch.float64)
    err = (qw.dequantize(torch.float64) - ref).abs()
    step = per_element(qw.scale, g, cols).to(torch.float64)
    assert bool((err <= step * (0.5 + 1e-5) + 1e-6 * ref.abs()).all()), float((err / step).max())
    zeros = w == 0
    assert bool((qw.dequantize(torch.float32)[zeros] == 0).all())  # exact zeros stay exact


@SETTINGS
@given(wg=weights(), strategy=st.sampled_from(["channel", "tensor"]))
def test_fp8_codes_in_range_and_relative_error(wg, strategy):
    w, _ = wg
    qw = quantize_rtn(w, Scheme(WeightScheme(num_bits=8, type="float", strategy=strategy, group_size=None)))
    codes = qw.codes.to(torch.float32)
    assert qw.codes.dtype == FP8_DTYPE and qw.zero_point is None
    assert bool(torch.isfinite(codes).all()) and float(codes.abs().max()) <= FP8_MAX
    scale = qw.scale.to(torch.float64).reshape(-1, 1)
    ref = w.to(torch.float64)
    err = (qw.dequantize(torch.float64) - ref).abs()
    # E4M3: 3 mantissa bits, half an ulp is 2**-4 of the value; subnormals step 2**-9 of the scale.
    assert bool((err <= 2.0**-4 * ref.abs() + 2.0**-10 * scale + 1e-7 * ref.abs()).all())
    assert bool((qw.dequantize(torch.float32)[w == 0] == 0).all())


# --------------------------------------------------------------------------- pack / unpack


@SETTINGS
@given(bits=st.sampled_from([2, 4, 8]), dim=st.sampled_from([0, 1]), rows=st.integers(1, 8),
       cols=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_pack_int32_round_trip(bits, dim, rows, cols, seed):
    pf = 32 // bits
    shape = [rows, cols]
    shape[dim] *= pf
    v = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    packed = pack_int32(v, bits, dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == shape[dim] // pf
    assert torch.equal(unpack_int32(packed, bits, dim), v)
    if bits == 4 and dim == 1:
        assert torch.equal(unpack_awq(pack_awq(v)), v)


def decode(fmt: str, prefix: str, t: dict, bits: int, symmetric: bool):
    """Codes, scale and zero point (signed, ``[out, ...]`` layout) read back from a format's tensors."""
    if fmt == "compressed-tensors":
        codes = to_signed(unpack_int32(t[f"{prefix}.weight_packed"], bits, 1), bits)
        zero = None if symmetric else to_signed(unpack_int32(t[f"{prefix}.weight_zero_point"], bits, 0), bits)
        return codes, t[f"{prefix}.weight_scale"], zero
    if fmt == "gptq":
        codes = to_signed(unpack_int32(t[f"{prefix}.qweight"], bits, 0).t(), bits)
        zeros = to_signed((unpack_int32(t[f"{prefix}.qzeros"], bits, 1) + 1).t(), bits)  # v1 stores zero - 1
        return codes, t[f"{prefix}.scales"].t(), None if symmetric else zeros
    codes = to_signed(unpack_awq(t[f"{prefix}.qweight"]).t(), 4)
    return codes, t[f"{prefix}.scales"].t(), to_signed(unpack_awq(t[f"{prefix}.qzeros"]).t(), 4)


@SETTINGS
@given(wg=weights(rows_multiple=8), bits=st.sampled_from([4, 8]), symmetric=st.booleans(),
       fmt=st.sampled_from(["compressed-tensors", "gptq", "awq"]))
def test_format_tensors_unpack_to_the_same_codes(wg, bits, symmetric, fmt):
    w, g = wg
    scheme = int_scheme(bits, g, symmetric)
    assume(FORMATS[fmt]().unsupported_reason(scheme) is None)
    qw = quantize_rtn(w, scheme)
    if fmt == "gptq" and not symmetric:
        assume(bool((qw.zero_point != -(2 ** (bits - 1))).all()))  # v1 cannot store the lowest zero
    tensors = FORMATS[fmt]().weight_tensors("layer", qw, torch.float32)
    codes, scale, zero = decode(fmt, "layer", tensors, bits, symmetric)
    assert torch.equal(codes, qw.codes)
    stored = torch.float32 if fmt == "compressed-tensors" else torch.float16
    assert torch.equal(scale, qw.scale.to(stored))
    assert (zero is None) == (qw.zero_point is None)
    if zero is not None:
        assert torch.equal(zero, qw.zero_point)
    if fmt == "gptq":
        assert torch.equal(tensors["layer.g_idx"], (torch.arange(w.shape[1]) // (g if g > 0 else w.shape[1])).int())
    assert math.prod(codes.shape) == w.numel()
