"""A run killed with SIGKILL part-way resumes from its last finished layer, bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from tests.tiny_models import make_tiny_model


def test_kill_then_resume_gives_identical_checkpoint(tmp_path, text_file):
    model = make_tiny_model(tmp_path / "m", layers=6, hidden=128, intermediate=256)
    recipe = {
        "model": {"id": str(model)},
        "quantization": {"method": "gptq", "group_size": 64, "act_order": True, "static_groups": True},
        "calibration": {"source": str(text_file), "num_samples": 8, "max_seq_length": 64},
        "evaluate": {"source": str(text_file), "num_samples": 2, "max_seq_length": 64},
        "export": {"output_dir": str(tmp_path / "killed"), "max_shard_size": "200KB"},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(recipe))
    recipe["export"]["output_dir"] = str(tmp_path / "straight")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "quantkit", "--quiet", "run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen(cmd + [str(tmp_path / "a.yaml")], env=env, stderr=subprocess.PIPE)
    state = tmp_path / ".killed.quantkit-partial" / "state.json"
    finished = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                finished = json.loads(state.read_text())["finished_layers"]
            except (ValueError, KeyError):
                finished = 0
            if finished >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert 2 <= finished < 6
    assert not (tmp_path / "killed").exists()  # nothing half-written where users look

    resumed = subprocess.run(cmd[:3] + ["run", "--resume", str(tmp_path / "a.yaml")], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: replaying" in resumed.stderr
    # The killed run's lock is stale (its process is gone): the resume takes it over and says so.
    assert f"taking over the stale lock {tmp_path / '.killed.quantkit-lock'} of a run that is gone (pid {proc.pid}" \
        in resumed.stderr
    assert not (tmp_path / ".killed.quantkit-lock").exists()
    straight = subprocess.run(cmd + [str(tmp_path / "b.yaml")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    a, b = tmp_path / "killed", tmp_path / "straight"
    names = sorted(p.name for p in b.iterdir() if p.name not in ("report.json", "README.md"))
    assert sorted(p.name for p in a.iterdir() if p.name not in ("report.json", "README.md")) == names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["evaluation"] == rb["evaluation"]
    assert not (tmp_path / ".killed.quantkit-partial").exists()


def test_resume_refuses_work_of_another_recipe(tmp_path, text_file):
    from quantkit import pipeline
    from quantkit.errors import ExportError
    from quantkit.recipe import make_recipe
    from quantkit.workdir import WorkDir

    model = make_tiny_model(tmp_path / "m", layers=1, hidden=128, intermediate=256)
    out = tmp_path / "out"
    WorkDir(tmp_path / ".out.quantkit-partial").start("someone-else", resume=False, weights={}, model_dir=model)
    recipe = make_recipe({"model": {"id": str(model)}, "quantization": {"method": "rtn"},
                          "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}})
    try:
        pipeline.run(recipe, quiet=True, resume=True)
    except ExportError as e:
        assert (e.field, e.file) == ("--resume", str(tmp_path / ".out.quantkit-partial"))
        assert e.hint == "delete it or run without --resume"
    else:
        raise AssertionError("resume accepted a work folder of another run")


def test_nibble_packing_round_trips_every_pair_of_4bit_codes():
    """Every pair of signed 4-bit codes, in either column, comes back as it was."""
    import itertools

    import torch

    from quantkit.workdir import pack_nibbles, unpack_nibbles

    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8).reshape(4, 128)
    packed = pack_nibbles(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 64)
    assert torch.equal(unpack_nibbles(packed), pairs)


def test_work_folder_keeps_4bit_codes_two_to_a_byte(tmp_path):
    """A layer of 4-bit Linears reloads with the same codes, scales and zero points from a file
    about half the size of one byte per code; 8-bit codes and odd rows stay a byte per code."""
    import dataclasses

    import torch

    from quantkit.scheme import QuantizedWeight, Scheme, WeightScheme
    from quantkit.workdir import LayerRecord, WorkDir

    g = torch.Generator().manual_seed(0)

    def weight(bits: int, cols: int, asym: bool) -> QuantizedWeight:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
        scheme = Scheme(WeightScheme(num_bits=bits, symmetric=not asym, group_size=cols), None)
        zero = torch.randint(lo, hi, (64, 1), generator=g, dtype=torch.int8) if asym else None
        return QuantizedWeight(codes=torch.randint(lo, hi, (64, cols), generator=g, dtype=torch.int8),
                               scale=torch.rand(64, 1, generator=g), zero_point=zero, scheme=scheme)

    quantized = {"a": weight(4, 512, True), "b": weight(4, 512, False), "c": weight(8, 512, False),
                 "d": weight(4, 511, False)}
    work = WorkDir(tmp_path / "work")
    work.start("fp", resume=False, weights={}, model_dir=tmp_path)
    work.save_layer(0, LayerRecord({}, quantized, {}), "fp")
    back = work.load_layer(0).quantized
    for name, qw in quantized.items():
        for f in ("codes", "scale", "zero_point"):
            a, b = getattr(qw, f), getattr(back[name], f)
            assert (a is None and b is None) or torch.equal(a, b), (name, f)
        assert dataclasses.asdict(back[name].scheme) == dataclasses.asdict(qw.scheme)
    one_byte = sum(qw.codes.numel() for qw in quantized.values())
    packed = one_byte - (quantized["a"].codes.numel() + quantized["b"].codes.numel()) // 2
    size = work.layer_path(0).stat().st_size
    assert packed < size < packed + 4096 + 64 * 4 * 4 + 64 * 2  # codes + header + scales + zero points
