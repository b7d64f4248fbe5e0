"""No run loses or corrupts data, and none exits 0 with a broken checkpoint (issue 21).

Each test builds the hostile input with a tiny 2-layer bf16 model and checks the outcome a user
sees: the error's parts (field, file), the one CLI line where wording is the interface, and the
files left on disk.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from quantkit import pipeline
from quantkit.checkpoint import CheckpointWriter
from quantkit.cli import main
from quantkit.errors import ExportError, ModelError, NumericsError
from quantkit.formats import FORMATS
from quantkit.interrupts import Terminated, terminate_as_interrupt
from quantkit.graph.runtime import ModelRunner
from quantkit.output_guard import MARKER, marker_text, old_dir_for
from quantkit.quantizers import QUANTIZERS
from quantkit.recipe import make_recipe
from quantkit.run_lock import RunLock, _process_start, lock_path_for
from quantkit.scheme import QuantizedWeight, Scheme, WeightScheme
from quantkit.workdir import WorkDir
from tests.test_errors import cli_error, gptq, recipe_file
from tests.tiny_models import make_tiny_model, write_text_file


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("safety") / "model", layers=2, hidden=64, intermediate=128,
                           dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("safety") / "sharded", layers=2, hidden=64, intermediate=128,
                           dtype=torch.bfloat16, max_shard_size="60KB")


def recipe_data(model_dir: Path, out: Path, **sections) -> dict:
    data = {"model": {"id": str(model_dir)}, "quantization": {"method": "rtn", "bits": 4, "group_size": 32},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cpu"}
    data.update(sections)
    return data


def run(model_dir: Path, out: Path, resume: bool = False, on_layer=None, **sections) -> dict:
    return pipeline.run(make_recipe(recipe_data(model_dir, out, **sections)), quiet=True, resume=resume,
                        on_layer=on_layer)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def killed_at_export(model_dir: Path, out: Path, monkeypatch, **sections) -> Path:
    """A run that dies after its last layer: every layer is finished and kept for --resume."""
    def boom(*a, **k):
        raise RuntimeError("killed at export")

    with monkeypatch.context() as m:
        m.setattr(pipeline.StreamingExport, "finish", boom)
        with pytest.raises(RuntimeError, match="killed at export"):
            run(model_dir, out, **sections)
    work = out.parent / f".{out.name}.quantkit-partial"
    assert json.loads((work / "state.json").read_text())["finished_layers"] == 2
    return work


def rewrite_weights(model: Path, name: str = "model.layers.1.mlp.up_proj.weight") -> None:
    """Change one weight in place: same names, shapes, dtypes and size (what the old fingerprint saw)."""
    path = model / "model.safetensors"
    sd = load_file(str(path))
    sd[name] = sd[name] * 2
    time.sleep(0.01)  # a distinct mtime even on coarse clocks
    # A new file renamed over the old: a run still mapping the old one reads it safely meanwhile.
    save_file(sd, str(path.with_suffix(".new")), metadata={"format": "pt"})
    os.replace(path.with_suffix(".new"), path)


# --------------------------------------------------------------------------- 1. output folders


@pytest.mark.parametrize("where, reason", [
    ("same", "is the same as model.id"), ("parent", "contains model.id"), ("inside", "lies inside model.id"),
    ("symlink", "is the same as model.id"), ("home", "is the same as model.id"),
    ("work-folder", "its work folder"),
])
def test_output_overlapping_the_model_is_refused_and_the_model_kept(tmp_path, model, monkeypatch, where, reason):
    home = tmp_path / "home"
    parent = home / (".out.quantkit-partial" if where == "work-folder" else "models")
    m = copy_model(model, parent / "m")
    before = snapshot(m)
    monkeypatch.setenv("HOME", str(home))
    out = {"same": m, "parent": parent, "inside": m / "quantized", "symlink": tmp_path / "link",
           "home": "~/models/m", "work-folder": home / "out"}[where]
    if where == "symlink":
        out.symlink_to(m)
    with pytest.raises(ExportError) as e:
        run(m, out, export={"output_dir": str(out), "overwrite": True})
    assert e.value.field == "export.output_dir" and reason in e.value.message
    assert snapshot(m) == before


def test_output_containing_the_calibration_file_is_refused(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(marker_text())
    text = write_text_file(out / "calib.jsonl")
    with pytest.raises(ExportError) as e:
        run(model, out, quantization={"method": "gptq", "bits": 4, "group_size": 32},
            calibration={"source": str(text), "num_samples": 2, "max_seq_length": 32},
            export={"output_dir": str(out), "overwrite": True})
    assert e.value.message == f"export.output_dir {out} contains calibration.source {text}"
    assert text.is_file()


def test_overwrite_replaces_only_a_folder_quantkit_wrote(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    overwrite = {"output_dir": str(out), "overwrite": True}
    with pytest.raises(ExportError) as e:
        run(model, out, export=overwrite)
    assert e.value.hint == "delete it yourself or choose another folder"
    assert f"{out} exists and is not a quantkit output" in e.value.message
    assert snapshot(out) == {"notes.txt": b"mine"}
    shutil.rmtree(out)
    run(model, out, export=overwrite)
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("old")
    run(model, out, export=overwrite)  # a folder quantkit published is replaced
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


def test_linked_output_is_replaced_without_touching_its_target(tmp_path, model):
    target = tmp_path / "previous"
    run(model, target)
    before = snapshot(target)
    (tmp_path / "out").symlink_to(target)
    run(model, tmp_path / "out", export={"output_dir": str(tmp_path / "out"), "overwrite": True})
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / MARKER).is_file()
    assert snapshot(target) == before


def test_publish_killed_between_its_renames_gives_the_old_output_back(tmp_path, model):
    out = tmp_path / "out"
    parked = old_dir_for(out)
    parked.mkdir()
    (parked / MARKER).write_text(marker_text())
    (parked / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="exists"):
        run(model, out)
    assert snapshot(out) == {MARKER: marker_text().encode(), "config.json": b"{}"} and not parked.exists()


# --------------------------------------------------------------------------- 2. one run per output folder


def test_second_run_fails_at_once_naming_the_running_one(tmp_path, model):
    out, work = tmp_path / "out", tmp_path / ".out.quantkit-partial"
    work.mkdir()
    (work / "state.json").write_text("the first run's")
    with RunLock(out, recipe="first.yaml"):
        for resume in (False, True):
            with pytest.raises(ExportError) as e:
                run(model, out, resume=resume)
            assert e.value.message.startswith(f"export.output_dir {out} is in use by another quantkit run "
                                              f"(pid {os.getpid()} on {socket.gethostname()}, started ")
            assert e.value.message.endswith(", recipe first.yaml)") and e.value.file == str(lock_path_for(out))
    assert (work / "state.json").read_text() == "the first run's" and not out.exists()


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, model, caplog):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = lock_path_for(out)
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier",
                                "recipe": "killed.yaml"}))
    caplog.set_level(logging.WARNING)
    run(model, out)
    assert [m for m in caplog.messages if m.startswith("taking over the stale lock")] == [
        f"taking over the stale lock {lock} of a run that is gone (pid {dead.pid} on {socket.gethostname()}, "
        "started earlier, recipe killed.yaml)"]
    assert not lock.exists() and (out / "config.json").is_file()


def test_lock_of_a_live_process_holds_even_where_flock_is_not_shared(tmp_path):
    """A lock file naming a running process (this one) is not taken over, flock or not."""
    out = tmp_path / "out"
    lock_path_for(out).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "process_start": _process_start(os.getpid())}))
    with pytest.raises(ExportError, match="is in use by another quantkit run"):
        RunLock(out).acquire()


# --------------------------------------------------------------------------- 3. resume over changed weights


def test_resume_refuses_weights_changed_in_place(tmp_path, model, monkeypatch):
    m = copy_model(model, tmp_path / "m")
    out = tmp_path / "out"
    killed_at_export(m, out, monkeypatch)
    rewrite_weights(m)
    with pytest.raises(ModelError) as e:
        run(m, out, resume=True)
    assert e.value.message == (f"--resume: the model's weights changed since the run started: "
                               f"{m / 'model.safetensors'} differs in its modification time")
    assert e.value.file == str(m / "model.safetensors") and not out.exists()


def test_full_fingerprint_resumes_a_copy_and_refuses_changed_contents(tmp_path, model, monkeypatch):
    m = copy_model(model, tmp_path / "m")
    out = tmp_path / "out"
    full = {"model": {"id": str(m), "fingerprint": "full"}}
    killed_at_export(m, out, monkeypatch, **full)
    os.utime(m / "model.safetensors", ns=(1, 1))  # what a copy without -p does: same bytes, new times
    run(m, out, resume=True, **full)
    assert (out / "config.json").is_file()
    out2 = tmp_path / "out2"
    killed_at_export(m, out2, monkeypatch, **full)
    rewrite_weights(m)
    with pytest.raises(ModelError, match="differs in its contents"):
        run(m, out2, resume=True, **full)


def test_fresh_run_does_not_discard_layers_it_could_resume(tmp_path, model, monkeypatch):
    out = tmp_path / "out"
    work = killed_at_export(model, out, monkeypatch)
    with pytest.raises(ExportError) as e:
        run(model, out)
    assert e.value.message == f"{work} holds 2 finished layers of an earlier run of this recipe"
    assert e.value.hint == "add --resume to continue it, or delete that folder to start over"
    run(model, out, resume=True)
    assert (out / "config.json").is_file() and not work.exists()


def test_weights_changed_during_the_run_are_not_published(tmp_path, model):
    m = copy_model(model, tmp_path / "m")
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="^before publishing: the model's weights changed since the run started"):
        run(m, out, on_layer=lambda i, layer, q: i == 1 and rewrite_weights(m, "model.layers.0.mlp.up_proj.weight"))
    assert not out.exists()


# --------------------------------------------------------------------------- 4. shards checked at open


def edit_header(path: Path, edit) -> None:
    """Rewrite a shard's JSON header through ``edit(header)``, keeping its data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def resave(path: Path, edit) -> None:
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def _same_offsets(h, a="model.layers.0.self_attn.q_proj.weight", b="model.layers.0.self_attn.o_proj.weight"):
    h[b]["data_offsets"] = h[a]["data_offsets"]


SHARD = "model.safetensors"
DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "(the file is truncated)"),
    "header-past-end": (lambda p: p.write_bytes(p.read_bytes()[:64]), "exceeds the file's 64 bytes"),
    "garbage-header": (lambda p: p.write_bytes(p.read_bytes()[:9] + b"\xff" * 8 + p.read_bytes()[17:]),
                       "header is not valid JSON"),
    "int-dtype": (lambda p: edit_header(p, lambda h: h["model.layers.1.mlp.up_proj.weight"].update(dtype="I16")),
                  "model.layers.1.mlp.up_proj.weight is I16, but the model needs a float tensor there"),
    "float-dtype-lie": (lambda p: edit_header(p, lambda h: h["model.norm.weight"].update(dtype="F16")),
                        "model.norm.weight is F16 while the checkpoint's other tensors are BF16"),
    "wrong-shape": (lambda p: resave(p, lambda sd: sd.update({"model.layers.1.mlp.down_proj.weight":
                                                              torch.zeros(64, 64, dtype=torch.bfloat16)})),
                    "model.layers.1.mlp.down_proj.weight has shape [64, 64], the config implies [64, 128]"),
    "missing-tensor": (lambda p: resave(p, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight")),
                       "model.layers.1.mlp.down_proj.weight is missing from the shards"),
    "overlap": (lambda p: edit_header(p, _same_offsets), "overlap the previous tensor's"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shard_is_refused_before_any_layer_runs(tmp_path, model, monkeypatch, caplog, damage):
    m = copy_model(model, tmp_path / "m")
    breakage, named = DAMAGE[damage]
    breakage(m / SHARD)
    monkeypatch.setattr(ModelRunner, "load_layer", lambda *a: pytest.fail("a layer ran"))
    caplog.set_level(logging.ERROR)
    with pytest.raises(ModelError) as e:
        run(m, tmp_path / "out")
    problems = [e.value.message.split(" (and ")[0]] + caplog.messages
    assert any(named in p for p in problems), problems
    assert e.value.field == "model.id"
    if damage not in ("missing-tensor", "wrong-shape"):  # validation finds these in the headers, before the files
        assert all(p.startswith(f"{m / SHARD}: ") for p in problems) and e.value.file == str(m / SHARD)


def test_index_naming_a_missing_shard_or_the_wrong_shard_lists_every_problem(tmp_path, sharded, monkeypatch, caplog):
    m = copy_model(sharded, tmp_path / "m")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    moved = next(k for k, v in sorted(index["weight_map"].items()) if v == shards[0])
    index["weight_map"][moved] = shards[1]
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    (m / shards[2]).unlink()
    caplog.set_level(logging.ERROR)
    monkeypatch.setattr(ModelRunner, "load_layer", lambda *a: pytest.fail("a layer ran"))
    with pytest.raises(ModelError) as e:
        run(m, tmp_path / "out")
    problems = [e.value.message.split(" (and ")[0]] + caplog.messages
    assert f"{m / shards[1]}: tensor {moved} is listed in model.safetensors.index.json but not in this shard's header" \
        in problems
    assert any(p.startswith(f"{m / shards[2]}: shard listed in model.safetensors.index.json") for p in problems)
    assert e.value.message.endswith(f"(and {len(problems) - 1} more, listed above)")


def test_damaged_shard_is_one_cli_line(tmp_path, model, capsys):
    m = copy_model(model, tmp_path / "m")
    DAMAGE["truncated"][0](m / SHARD)
    path = recipe_file(tmp_path, m)
    raw = (m / SHARD).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    data = len(raw) - 8 - n
    assert cli_error(capsys, "run", path) == (
        f"error: {m / SHARD}: tensor {last}: ends at byte {data + 100} of data but the file holds {data} "
        "(the file is truncated); re-download or re-convert the model")


# --------------------------------------------------------------------------- 5. non-finite values


@pytest.mark.parametrize("name", ["lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_outside_the_layers_stops_the_run(tmp_path, model, name, bad):
    m = copy_model(model, tmp_path / "m")
    resave(m / SHARD, lambda sd: sd[name].view(-1).__setitem__(7, bad))
    with pytest.raises(NumericsError) as e:
        run(m, tmp_path / "out")
    assert e.value.message == f"model: tensor {name} in {m / SHARD} contains NaN or Inf"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_an_elementwise_check(dtype):
    """`all_finite` reads only a tensor's extremes: one NaN or Inf anywhere (fresh random
    positions and sizes, strided views too) must still be found, as ``isfinite`` per element says."""
    from quantkit.finite_check import all_finite

    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    for _ in range(40):
        rows, cols = (int(x) for x in torch.randint(1, 300, (2,), generator=g))
        t = torch.randn(rows, cols, generator=g).to(dtype)
        if bool(torch.rand((), generator=g) < 0.5):
            t = t.t()  # not contiguous
        if bool(torch.rand((), generator=g) < 0.75):
            i = int(torch.randint(t.numel(), (), generator=g))
            bad = [float("nan"), float("inf"), -float("inf")][int(torch.randint(3, (), generator=g))]
            t[i // t.shape[1], i % t.shape[1]] = bad
        assert all_finite(t) == bool(torch.isfinite(t).all())
    assert all_finite(torch.empty(0, 5, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), 0.0])
def test_bad_scale_from_a_quantizer_stops_the_run_naming_it(tmp_path, model, monkeypatch, bad):
    real = QUANTIZERS["rtn"].quantize_layer

    def poisoned(self, *args):
        out = real(self, *args)
        out["mlp.up_proj"].scale[3, 1] = bad
        return out

    monkeypatch.setattr(QUANTIZERS["rtn"], "quantize_layer", poisoned)
    with pytest.raises(NumericsError) as e:
        run(model, tmp_path / "out")
    assert e.value.message.startswith(f"model.layers.0.mlp.up_proj.scale: a scale is {bad}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme, field", [("NVFP4A16", "global_scale"), ("NVFP4", "input_global_scale"),
                                           ("MXFP4A16", "scale")])
@pytest.mark.parametrize("bad", [float("inf"), 0.0])
def test_bad_fp4_scale_stops_the_run_naming_it(tmp_path, model, monkeypatch, scheme, field, bad):
    """The FP4 schemes' scales are checked like any other: the global scales of tensor groups
    (NVFP4: every group scale is divided by one), and MXFP4's E8M0 scales as the powers of two
    they stand for (one that is zero or Inf would be clamped to a wrong exponent on export)."""
    real = QUANTIZERS["rtn"].quantize_layer

    def poisoned(self, *args):
        out = real(self, *args)
        getattr(out["mlp.down_proj"], field).view(-1)[0] = bad  # down_proj: no fused shard shares its global scale
        return out

    monkeypatch.setattr(QUANTIZERS["rtn"], "quantize_layer", poisoned)
    with pytest.raises(NumericsError) as e:
        run(model, tmp_path / "out", quantization={"method": "rtn", "scheme": scheme},
            calibration={"source": "shakespeare", "num_samples": 2, "max_seq_length": 32})
    assert e.value.file == f"model.layers.0.mlp.down_proj.{field}" and e.value.value == bad
    assert not (tmp_path / "out").exists()


def test_writer_never_publishes_non_finite_or_zero_scales(tmp_path):
    """The last guard, whatever produced the tensors: a float16 scale that underflows to zero, a
    NaN float tensor and an E8M0 scale holding its NaN code are refused and nothing is published."""
    w4 = Scheme(WeightScheme(num_bits=4, symmetric=True, strategy="group", group_size=32))
    tiny = QuantizedWeight(codes=torch.zeros(8, 64, dtype=torch.int8), scale=torch.full((8, 2), 1e-9),
                           zero_point=None, scheme=w4)
    e8m0 = torch.tensor([[127, 255]], dtype=torch.uint8)  # 255: E8M0's NaN code
    for name, write in (("layer.scales", lambda w: w.add_quantized("layer", tiny)),
                        ("norm.weight", lambda w: w.add("norm.weight", torch.tensor([1.0, float("nan")]))),
                        ("mx.weight_scale", lambda w: w.add("mx.weight_scale", e8m0))):
        w = CheckpointWriter(tmp_path / "out", tmp_path / "stage", FORMATS["gptq"](), torch.bfloat16, 10**9, False)
        w.start()
        with pytest.raises(NumericsError) as e:
            write(w)
        assert e.value.message.startswith(name)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 7. careless input, one line


@pytest.mark.parametrize("errno_, said", [(errno.ENOSPC, "no space left on the disk"),
                                          (errno.EFBIG, "the file-size limit (ulimit -f) was reached")])
def test_full_disk_says_what_is_kept_for_resume(tmp_path, model, monkeypatch, capsys, errno_, said):
    from quantkit import workdir as workdir_module

    real, calls = workdir_module.write_safetensors, []

    def full_at_second_layer(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError(errno_, os.strerror(errno_))
        return real(path, *a, **k)

    monkeypatch.setattr(workdir_module, "write_safetensors", full_at_second_layer)
    out, work = tmp_path / "out", tmp_path / ".out.quantkit-partial"
    path = recipe_file(tmp_path, model)
    assert cli_error(capsys, "run", path) == (
        f"error: {said} while writing {work}; 1 of 2 layers are finished and kept in {work}; {out} is untouched; "
        "free space (or raise the limit), then run again with --resume to continue")
    assert sorted(p.name for p in (work / "layers").iterdir()) == ["00000.safetensors"]
    assert main(["--quiet", "run", "--resume", str(path)]) == 0 and (out / "config.json").is_file()


def test_file_size_limit_is_one_line_for_real(tmp_path, model, capsys):
    """ulimit -f for real: Python ignores SIGXFSZ, so the write fails with EFBIG and the run says so."""
    import resource

    out, work = tmp_path / "out", tmp_path / ".out.quantkit-partial"
    path = recipe_file(tmp_path, model)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # A work layer (~40 KB) fits; the exported shard, written from byte 1 MiB on (its header's room),
    # does not. The export, beside the engine, fails on its first tensors: the first layer's
    # hand-off says so.
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        line = cli_error(capsys, "run", path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert line == (f"error: the file-size limit (ulimit -f) was reached while writing {work}; 1 of 2 layers are "
                    f"finished and kept in {work}; {out} is untouched; free space (or raise the limit), then run "
                    "again with --resume to continue")
    assert not (work / "export").exists()
    assert main(["--quiet", "run", "--resume", str(path)]) == 0 and (out / "config.json").is_file()


@pytest.mark.parametrize("case", ["config-list", "config-bad-hidden", "quantized", "device", "under-a-file",
                                  "repo-id", "chat-shape", "non-utf8-jsonl", "non-utf8-txt", "bad-json-row"])
def test_careless_input_is_one_line(tmp_path, model, capsys, case):
    m, out = model, tmp_path / "out"
    extra: dict = {}
    if case.startswith(("config", "quantized")):
        m = copy_model(model, tmp_path / "m")
        config = json.loads((m / "config.json").read_text())
        config = {"config-list": [config], "config-bad-hidden": {**config, "hidden_size": "wide"},
                  "quantized": {**config, "quantization_config": {"quant_method": "gptq"}}}[case]
        (m / "config.json").write_text(json.dumps(config))
    elif case == "device":
        extra = {"device": "gpu"}
    elif case == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "repo-id":
        extra = {"push": {"repo_id": "me/my model"}}
    elif case == "chat-shape":
        (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                                             + json.dumps({"messages": "hello"}) + "\n")
        extra = gptq(tmp_path / "chat.jsonl", messages_column="messages")
    else:
        name = {"non-utf8-jsonl": "t.jsonl", "non-utf8-txt": "t.txt", "bad-json-row": "t.jsonl"}[case]
        second = b'{"text": "caf\xe9"}' if case == "non-utf8-jsonl" else b"\xff\xfe" if case == "non-utf8-txt" \
            else b'{"text": "unterminated}'
        (tmp_path / name).write_bytes(b'{"text": "fine"}\n' + second + b"\n")
        extra = gptq(tmp_path / name)
    path = recipe_file(tmp_path, m, export={"output_dir": str(out)}, **extra)
    text = tmp_path / ("t.txt" if case == "non-utf8-txt" else "t.jsonl")
    expected = {
        "config-list": f"model.id: {m / 'config.json'} is not a JSON object of config fields; fix or re-download "
                       "config.json",
        "config-bad-hidden": f"{m / 'config.json'}: field 'hidden_size' must be a positive integer, got 'wide'",
        "quantized": f"model.id: {m} is already quantized (gptq: config.json has a quantization_config); give the "
                     "original float model (its bf16/fp16 safetensors)",
        "device": f"{path}: field 'device': use auto, cpu, cuda or cuda:N (got 'gpu')",
        "under-a-file": f"export.output_dir {out}: {tmp_path / 'file'} is a file, not a folder; choose an output "
                        "folder outside it",
        "repo-id": f"{path}: field 'push.repo_id': 'me/my model' is not a valid Hub repo id (Repo id must use "
                   "alphanumeric chars, '-', '_' or '.'. The name cannot start or end with '-' or '.' and the "
                   "maximum length is 96: 'me/my model'.); use namespace/name: letters, digits, '-', '_' and '.' "
                   "(got 'me/my model')",
        "chat-shape": f"calibration.source '{tmp_path / 'chat.jsonl'}': row 2: 'messages' is not a list of messages "
                      "with a string 'role' and 'content' (got 'hello'); write e.g. [{\"role\": \"user\", "
                      "\"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]",
        "non-utf8-jsonl": f"calibration.source {text}: row 2 is not UTF-8 text (byte 14 of the row is 0xe9); save "
                          "the file as UTF-8",
        "non-utf8-txt": f"calibration.source {text}: row 2 is not UTF-8 text (byte 1 of the row is 0xff); save the "
                        "file as UTF-8",
        "bad-json-row": f"calibration.source {text}: row 2 is not valid JSON (Unterminated string starting at, "
                        "column 10); write one JSON object per line",
    }[case]
    assert cli_error(capsys, "run", path) == f"error: {expected}"
    assert not out.exists()


def test_config_transformers_refuses_is_one_error(tmp_path, model):
    m = copy_model(model, tmp_path / "m")
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "rope_scaling": "garbage"}))
    with pytest.raises(ModelError) as e:
        run(m, tmp_path / "out")
    assert e.value.message.startswith(f"model.id: {m / 'config.json'}: transformers cannot build the model from it (")
    assert e.value.file == str(m / "config.json")


def test_model_without_a_tokenizer_is_refused_before_the_run(tmp_path, model):
    m = copy_model(model, tmp_path / "m")
    for f in m.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelError) as e:
        run(m, tmp_path / "out")
    assert e.value.message.startswith(f"model.id: {m}: the tokenizer cannot be loaded (")
    assert e.value.hint == "the folder needs tokenizer.json or tokenizer.model with tokenizer_config.json"
    assert not lock_path_for(tmp_path / "out").exists()


def test_eval_of_a_damaged_checkpoint_is_one_line(tmp_path, model, capsys):
    m = copy_model(model, tmp_path / "m")
    DAMAGE["header-past-end"][0](m / SHARD)
    assert cli_error(capsys, "eval", m).startswith(f"error: {m / SHARD}: header length ")


def test_push_refuses_an_invalid_repo_id_before_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail otherwise
    assert cli_error(capsys, "push", tmp_path, "a/b/c") == (
        "error: 'a/b/c' is not a valid Hub repo id (Repo id must be in the form 'repo_name' or "
        "'namespace/repo_name': 'a/b/c'. Use `repo_type` argument if needed.); use namespace/name: letters, "
        "digits, '-', '_' and '.'")


def test_home_in_every_path_expands(tmp_path, model, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_text_file(tmp_path / "calib.jsonl", n_docs=8)
    data = recipe_data(model, Path("~/out"), **gptq(Path("~/calib.jsonl")))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert main(["--quiet", "run", "~/r.yaml"]) == 0
    assert main(["--quiet", "run", "~/r.yaml", "--output-dir", "~/out2"]) == 0
    for out in ("out", "out2"):
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["output_dir"] == str(tmp_path / out)
    assert not (Path.cwd() / "~").exists()


def test_length_checks_only_for_sections_that_run(tmp_path, model):
    """RTN reads no calibration text and evaluation is off: neither section's length is refused."""
    run(model, tmp_path / "out", calibration={"max_seq_length": 4096},
        evaluate={"enabled": False, "max_seq_length": 4096})
    assert (tmp_path / "out" / "config.json").is_file()


# --------------------------------------------------------------------------- 8. Ctrl-C and SIGTERM


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("safety") / "four", layers=4, hidden=64, intermediate=128)


def signal_after_first_layer(monkeypatch, sig: int) -> None:
    """Sends ``sig`` to this process once the work folder records layer 1 of the run, from the
    thread that records it. A thread polling the state file instead missed layers 1-3 of this
    tiny model on a loaded machine: the run finished with rc 0."""
    write = WorkDir._write_state

    def write_then_signal(self, fingerprint: str, finished: int) -> None:
        write(self, fingerprint, finished)
        if finished == 1:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(WorkDir, "_write_state", write_then_signal)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_leaves_output_untouched_lock_released_and_work_resumable(tmp_path, slow_model, text_file,
                                                                                 capsys, monkeypatch, sig):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(marker_text())
    (out / "config.json").write_text("previous")
    path = recipe_file(tmp_path, slow_model, **gptq(text_file, num_samples=8),
                       export={"output_dir": str(out), "overwrite": True})
    state = tmp_path / ".out.quantkit-partial" / "state.json"
    capsys.readouterr()
    with monkeypatch.context() as patched:
        signal_after_first_layer(patched, sig)
        rc = main(["--quiet", "run", str(path)])
    err = capsys.readouterr().err
    assert rc == 128 + sig, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    name = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C (SIGINT)"
    assert err.startswith(f"error: interrupted by {name}; ") and " of 4 layers are finished and kept in " in err
    assert err.endswith(f"; {out} is untouched; run again with --resume to continue\n")
    assert snapshot(out) == {MARKER: marker_text().encode(), "config.json": b"previous"}
    assert not lock_path_for(out).exists() and not list(state.parent.glob("layers/*.tmp"))
    assert not [t for t in threading.enumerate() if t.name.startswith("quantkit-export")]  # joined
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run's handler is gone with it
    if sig == signal.SIGTERM:
        assert main(["--quiet", "run", "--resume", str(path)]) == 0
        assert (out / "model.safetensors").is_file() and not state.parent.exists()


def test_interrupt_during_the_publishing_swap_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM landing between the two renames is held until both are done: the output is the
    new checkpoint, never missing, and the run then stops."""
    import quantkit.checkpoint as checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(marker_text())
    real = os.replace

    def replace_then_signal(a, b):
        real(a, b)
        if Path(b) == old_dir_for(out):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here if it is not held back

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_signal)
    w = CheckpointWriter(out, tmp_path / "stage", FORMATS["compressed-tensors"](), torch.bfloat16, 10**9, True)
    w.start()
    w.add("x", torch.ones(2))
    with terminate_as_interrupt(), pytest.raises(Terminated):
        w.finalize({"model_type": "llama"}, {}, [])
    assert w.published and (out / "model.safetensors").is_file() and not old_dir_for(out).exists()
