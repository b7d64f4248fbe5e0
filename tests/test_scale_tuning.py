"""``quantkit tune``: the numerics against float64, the tuned checkpoint on disk closer to its
base than the run's, only scales and norm weights rewritten, and all or nothing on failure."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantkit import pipeline
from quantkit.cli import main as cli_main
from quantkit.errors import ExportError, NumericsError
from quantkit.recipe import make_recipe
from quantkit.group_scaled import group_weight
from quantkit.scale_tuning import TUNED_SUFFIX, next_token_kl, rewrite_shards, shard_copies


def test_group_weight_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(-8, 8, (6, 32), generator=g, dtype=torch.int8)
    scale = torch.rand(6, 4, generator=g) + 0.1
    expect = torch.empty(6, 32, dtype=torch.float64)
    for row in range(6):
        for col in range(32):
            expect[row, col] = float(steps[row, col]) * scale[row, col // 8].double()
    torch.testing.assert_close(group_weight(steps, scale, torch.float32).double(), expect, rtol=1e-6, atol=0)


def test_next_token_kl_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 2
    p = teacher.double().softmax(-1)
    expect = (p * (p.log() - student.double().log_softmax(-1))).sum(-1)
    torch.testing.assert_close(next_token_kl(student, teacher).double(), expect, rtol=1e-5, atol=1e-7)
    assert next_token_kl(teacher, teacher).abs().max() < 1e-6


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_packed_linears_read_back_what_the_export_wrote(bits, symmetric):
    """The codes less their zero points times the scales, as read from the tensors the
    compressed-tensors export writes, are the quantized weight's own dequantization."""
    from quantkit.formats.compressed_tensors import CompressedTensorsFormat
    from quantkit.quantizers.rtn import quantize_rtn, weight_only_scheme
    from quantkit.scale_tuning import packed_linears

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    qw = quantize_rtn(w, weight_only_scheme(bits, 32, symmetric))
    tensors = CompressedTensorsFormat().weight_tensors("model.layers.0.mlp.up_proj", qw, torch.float32)
    (name, (steps, scale)), = packed_linears(tensors, bits).items()
    assert name == "model.layers.0.mlp.up_proj"
    assert steps.dtype == (torch.int8 if bits < 8 else torch.int16)
    torch.testing.assert_close(group_weight(steps, scale, torch.float64), qw.dequantize(torch.float64),
                               rtol=1e-6, atol=1e-7)


def _mean_kl(checkpoint, base, ids) -> float:
    from transformers import AutoModelForCausalLM

    from quantkit.evaluate import load_for_evaluation

    student, _ = load_for_evaluation(checkpoint, torch.device("cpu"))
    teacher = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        return next_token_kl(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1]).mean().item()


def test_tune_brings_the_checkpoint_on_disk_closer_to_its_base(tiny_llama, text_file, tmp_path, capsys,
                                                                monkeypatch):
    """After a GPTQ W4A16 g64 asymmetric run, `tune` rewrites the folder so that the model
    transformers loads from it is closer to the base model (next-token KL on the run's
    calibration windows) than the run's own checkpoint; codes, zero points and every other
    tensor are byte-identical, and report.json and the card say what was done. The KL it
    reports is scored on the first windows up to KL_TOKENS tokens (here 4 of 16)."""
    from quantkit import scale_tuning
    from quantkit.calibration import TextRequest, load_tokens
    from quantkit.model import load_tokenizer

    scored, mean_kl = [], scale_tuning.mean_kl
    monkeypatch.setattr(scale_tuning, "KL_TOKENS", 4 * 64 + 63)
    monkeypatch.setattr(scale_tuning, "mean_kl", lambda student, teacher, ids, batch: scored.append(ids) or mean_kl(
        student, teacher, ids, batch))

    out = tmp_path / "out"
    pipeline.run(make_recipe({
        "model": {"id": str(tiny_llama)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False},
        "calibration": {"source": str(text_file), "num_samples": 16, "max_seq_length": 64, "batch_size": 4},
        "evaluate": {"source": str(text_file), "num_samples": 4, "max_seq_length": 64},
        "export": {"output_dir": str(out)},
    }), quiet=True)
    before = tmp_path / "before"
    shutil.copytree(out, before)

    assert cli_main(["--quiet", "tune", str(out), "--steps", "16", "--batch-size", "4", "--lr", "1e-2",
                     "--device", "cpu"]) == 0
    assert "KL from base on 4 calibration windows" in capsys.readouterr().out

    old, new = {}, {}
    for folder, into in ((before, old), (out, new)):
        for shard in sorted(folder.glob("*.safetensors")):
            into.update(load_file(str(shard)))
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed, "tune changed nothing"
    assert all(k.endswith(".weight_scale") or k.endswith("norm.weight") for k in changed), sorted(changed)
    assert any(k.endswith("norm.weight") for k in changed) and any(k.endswith(".weight_scale") for k in changed)
    assert all(old[k].dtype == new[k].dtype for k in changed)
    assert not list(out.glob(f"*{TUNED_SUFFIX}"))

    report = json.loads((out / "report.json").read_text())
    tuning = report["tuning"]
    assert tuning["kl_after"] < tuning["kl_before"] and tuning["kl_windows"] == 4
    assert "next-token KL on 4 of those windows" in (out / "README.md").read_text()

    ids = torch.stack(load_tokens(TextRequest(str(text_file), 16, 64, True, 0, True), load_tokenizer(tiny_llama),
                                  tiny_llama))
    assert len(scored) == 2 and all(torch.equal(s, ids[:4]) for s in scored)
    assert _mean_kl(out, tiny_llama, ids) < 0.9 * _mean_kl(before, tiny_llama, ids)  # 0.72 when written


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_tune_brings_other_families_closer_to_their_base(arch, text_file, tmp_path):
    """Gemma 3 (offset norms, sliding-window layers, a tied head) and Qwen 3 (q_norm/k_norm)
    tune as Llama does: the checkpoint transformers loads from the folder is closer to its base."""
    from quantkit import tune
    from quantkit.calibration import TextRequest, load_tokens
    from quantkit.model import load_tokenizer
    from tests.tiny_models import make_tiny_model

    base = make_tiny_model(tmp_path / arch, arch=arch, layers=2, hidden=128, intermediate=256)
    out = tmp_path / "out"
    pipeline.run(make_recipe({
        "model": {"id": str(base)},
        "quantization": {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": False},
        "calibration": {"source": str(text_file), "num_samples": 16, "max_seq_length": 64, "batch_size": 4},
        "evaluate": {"enabled": False},
        "export": {"output_dir": str(out)},
    }), quiet=True)
    before = tmp_path / "before"
    shutil.copytree(out, before)
    tuning = tune(out, steps=16, batch_size=4, lr=1e-2, device="cpu", quiet=True)
    assert tuning["kl_after"] < tuning["kl_before"]
    ids = torch.stack(load_tokens(TextRequest(str(text_file), 16, 64, True, 0, True), load_tokenizer(base), base))
    assert _mean_kl(out, base, ids) < 0.9 * _mean_kl(before, base, ids)


def test_the_int8_student_tunes_as_the_float32_parametrized_one_did(tiny_llama, text_file, tmp_path):
    """The student tune trains, each quantized Linear swapped for its int8 codes (1 byte a weight
    and 8 a group: the scale and θ), gives the losses and the tuned tensors of the one it
    replaced: the float32 model with each Linear's weight parametrized by the float formula."""
    from torch import nn
    from torch.nn.utils import parametrize
    from transformers import AutoModelForCausalLM

    from quantkit.evaluate import load_for_evaluation
    from quantkit.scale_tuning import load_student, norm_weights, read_packed, tune, tuned_tensors
    from quantkit.tune_settings import TuneSettings

    class FloatScaled(nn.Module):  # what tune held before: float32 steps, the weight computed by autograd
        def __init__(self, steps, scale):
            super().__init__()
            self.steps, self.scale, self.stored_dtype = steps.float(), scale.float(), scale.dtype
            self.theta = nn.Parameter(torch.zeros_like(self.scale))

        def stored_scale(self):
            return (self.scale * self.theta.exp()).to(self.stored_dtype)

        def forward(self, _weight):
            group = self.steps.shape[1] // self.scale.shape[1]
            return self.steps * (self.scale * self.theta.exp()).repeat_interleave(group, dim=1)

    out = tmp_path / "out"
    pipeline.run(make_recipe({
        "model": {"id": str(tiny_llama)},
        "quantization": {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False},
        "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 32, "batch_size": 4},
        "export": {"output_dir": str(out)},
    }), quiet=True)
    linears, stored = read_packed(out, 4, torch.device("cpu"))
    cpu = torch.device("cpu")
    new, new_scaled = load_student(out, linears, cpu, "out")
    old = load_for_evaluation(out, cpu)[0].float().requires_grad_(False)
    old_scaled = {name: FloatScaled(steps, scale) for name, (steps, scale) in linears.items()}
    for name, p in old_scaled.items():
        parametrize.register_parametrization(old.get_submodule(name), "weight", p, unsafe=True)

    held = {name: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            for name, m in new_scaled.items()}
    assert held == {name: steps.numel() + 8 * scale.numel() for name, (steps, scale) in linears.items()}
    assert not new.training
    assert {id(p) for p in new.parameters() if p.requires_grad} == {id(m.theta) for m in new_scaled.values()}

    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval().requires_grad_(False)
    ids = torch.randint(0, teacher.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    runs = []
    for student, scaled in ((new, new_scaled), (old, old_scaled)):
        norms = norm_weights(student)
        for w in norms.values():
            w.requires_grad_(True)
        losses = tune(student, teacher, ids, [m.theta for m in scaled.values()] + list(norms.values()),
                      TuneSettings(steps=4, lr=1e-2, batch_size=4))
        runs.append((losses, tuned_tensors(scaled, norms, stored)))
    (new_losses, new_tensors), (old_losses, old_tensors) = runs
    torch.testing.assert_close(new_losses, old_losses, rtol=1e-5, atol=0)
    assert new_losses[-1] < new_losses[0]
    assert new_tensors.keys() == old_tensors.keys()
    for name, tensor in new_tensors.items():
        torch.testing.assert_close(tensor, old_tensors[name], rtol=1e-5, atol=0)
    name, (_, scale) = next(iter(linears.items()))
    assert not torch.equal(new_tensors[f"{name}.weight_scale"], scale)  # the scales moved


def _rewrite(folder, changed):
    """What tune_checkpoint does around its tuning: the copies, then the rewrite into them."""
    with shard_copies(folder) as copies:
        return rewrite_shards(copies, changed)


def _two_shards(folder):
    folder.mkdir()
    save_file({"a.weight_scale": torch.ones(2, 2, dtype=torch.bfloat16)}, str(folder / "model-1.safetensors"),
              metadata={"format": "pt"})
    save_file({"b.weight_scale": torch.ones(3), "b.weight_packed": torch.arange(4, dtype=torch.int32)},
              str(folder / "model-2.safetensors"), metadata={"format": "pt"})
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_products_are_bf16_only_on_a_gpu_with_bf16_tensor_cores(monkeypatch):
    from quantkit.tune_memory import products_dtype

    asked = []

    def native(including_emulation=True):
        asked.append(including_emulation)
        return support

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native)
    for support, expected in ((True, torch.bfloat16), (False, torch.float32)):
        assert products_dtype(torch.device("cuda")) == expected
    assert asked == [False, False]  # emulated bf16 is not asked for
    assert products_dtype(torch.device("cpu")) == torch.float32 and len(asked) == 2  # nor CUDA on the CPU


def test_the_base_is_held_in_bf16_only_on_a_gpu_and_only_when_stored_so():
    from quantkit.tune_memory import teacher_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert teacher_dtype(cuda, torch.bfloat16) == torch.bfloat16
    assert teacher_dtype(cuda, torch.float16) == teacher_dtype(cuda, torch.float32) == torch.float32
    assert teacher_dtype(cpu, torch.bfloat16) == torch.float32


def test_tensor_cores_are_asked_for_on_a_gpu_only_and_given_back():
    """The steps' float32 matmuls run as TF32 on a GPU; the process's setting is restored after,
    also when a step fails, and the CPU's is never touched."""
    from quantkit.scale_tuning import tensor_core_matmuls

    before = torch.get_float32_matmul_precision()
    with tensor_core_matmuls(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError, match="a step failed"):
        with tensor_core_matmuls(torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "high"
            raise RuntimeError("a step failed")
    assert torch.get_float32_matmul_precision() == before


def test_rewrite_shards_replaces_the_named_tensors_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "ckpt"
    _two_shards(folder)
    rewritten = _rewrite(folder, {"a.weight_scale": torch.full((2, 2), 2.0, dtype=torch.bfloat16),
                                        "b.weight_scale": torch.full((3,), 3.0)})
    assert rewritten == ["model-1.safetensors", "model-2.safetensors"]
    b = load_file(str(folder / "model-2.safetensors"))
    assert torch.equal(b["b.weight_scale"], torch.full((3,), 3.0))
    assert torch.equal(b["b.weight_packed"], torch.arange(4, dtype=torch.int32))
    assert load_file(str(folder / "model-1.safetensors"))["a.weight_scale"].dtype == torch.bfloat16
    assert sorted(p.name for p in folder.iterdir()) == ["model-1.safetensors", "model-2.safetensors"]


def test_a_failed_rewrite_leaves_every_shard_as_it_was(tmp_path, monkeypatch):
    """The second shard's copy fails after the first was written: nothing is replaced and the
    first's rewritten copy is gone; a tensor no shard holds, or one whose dtype or shape differs
    from the stored one (its bytes would not fit the place), is refused the same way."""
    folder = tmp_path / "ckpt"
    original = _two_shards(folder)
    real_copy, calls = shutil.copyfile, []

    def failing_copy(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    changed = {"a.weight_scale": torch.full((2, 2), 2.0, dtype=torch.bfloat16), "b.weight_scale": torch.full((3,), 2.0)}
    with pytest.raises(OSError, match="disk full"):
        _rewrite(folder, changed)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == original

    monkeypatch.setattr(shutil, "copyfile", real_copy)
    with pytest.raises(ExportError, match="no shard holds c.weight_scale"):
        _rewrite(folder, {**changed, "c.weight_scale": torch.zeros(1)})
    for wrong in (torch.zeros(3, dtype=torch.bfloat16), torch.zeros(4)):
        with pytest.raises(ExportError, match="b.weight_scale is F32 \\[3\\] there"):
            _rewrite(folder, {**changed, "b.weight_scale": wrong})
    # What the checkpoint writer would refuse to store: a scale tuned to Inf, or to zero.
    for bad, why in ((torch.tensor([1.0, float("inf"), 1.0]), "NaN or Inf"), (torch.zeros(3), "positive")):
        with pytest.raises(NumericsError, match=f"b.weight_scale.*{why}"):
            _rewrite(folder, {"a.weight_scale": changed["a.weight_scale"], "b.weight_scale": bad})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == original
    # The tuning itself fails while the copies are being written: they go too.
    with pytest.raises(RuntimeError, match="tuning failed"):
        with shard_copies(folder):
            raise RuntimeError("tuning failed")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == original


def test_a_disk_without_room_for_the_copies_is_refused_before_any_is_written(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "ckpt"
    original = _two_shards(folder)
    need = sum(len(b) for b in original.values())
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=need - 1))
    with pytest.raises(ExportError, match=f"{need / 1e6:.1f} MB in all, and {(need - 1) / 1e6:.1f} MB are free"):
        with shard_copies(folder):
            pytest.fail("the block ran although the copies cannot fit")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == original
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=need))
    assert _rewrite(folder, {"b.weight_scale": torch.full((3,), 2.0)}) == ["model-2.safetensors"]


def test_each_copy_is_on_disk_before_the_rewrite_writes_into_it(tmp_path, monkeypatch):
    """The background thread flushes each copy it wrote: written back later, near the rewrite,
    the rewrite's writes into its pages would wait for the disk."""
    import os

    folder = tmp_path / "ckpt"
    _two_shards(folder)
    flushed, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    with shard_copies(folder) as copies:
        copies.wait()
        assert flushed == [str(tmp) for tmp, _ in copies.pairs]


def test_a_rewrite_changes_only_the_tuned_tensors_bytes(tmp_path):
    """Everything but the tuned tensor's byte range, header and metadata included, is the file
    as it was."""
    from quantkit.shard_check import read_entries

    folder = tmp_path / "ckpt"
    before = _two_shards(folder)["model-2.safetensors"]
    entry = read_entries(folder / "model-2.safetensors")["b.weight_scale"]
    assert _rewrite(folder, {"b.weight_scale": torch.tensor([1.5, 2.0, 7.25])}) == ["model-2.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["model-1.safetensors", "model-2.safetensors"]
    after = (folder / "model-2.safetensors").read_bytes()
    assert len(after) == len(before)
    assert after[:entry.begin] == before[:entry.begin] and after[entry.end:] == before[entry.end:]
    assert after[entry.begin:entry.end] != before[entry.begin:entry.end]
    with safe_open(str(folder / "model-2.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("b.weight_scale"), torch.tensor([1.5, 2.0, 7.25]))


def _w4a16_folder(tmp_path):
    """A folder whose config.json is a one-scheme W4A16 pack-quantized checkpoint's."""
    folder = tmp_path / "w4a16"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4}}}}}))
    return folder


def test_tune_refuses_a_checkpoint_with_quantized_activations(tmp_path, capsys):
    folder = tmp_path / "w8a8"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 8}, "input_activations": {"num_bits": 8}}}}}))
    (folder / "report.json").write_text(json.dumps({"model": "builtin:smollm2-135m", "calibration": {
        "source": "shakespeare", "num_samples": 2, "max_seq_length": 16}}))
    assert cli_main(["tune", str(folder), "--base", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "pack-quantized" in err and str(folder) in err


def test_tune_from_python_names_the_bad_option(tmp_path):
    import quantkit
    from quantkit.errors import QuantkitError

    folder = _w4a16_folder(tmp_path)
    with pytest.raises(QuantkitError, match="--lr must be positive") as e:
        quantkit.tune(folder, lr=0.0)
    assert e.value.field == "--lr"
    with pytest.raises(QuantkitError, match="no report.json naming its base model"):
        quantkit.tune(folder)


def test_tune_stops_on_a_diverging_kl_and_names_the_learning_rate():
    """A step size that blows the logits up ends the tuning with an error naming --lr, instead
    of writing NaN scales."""
    from types import SimpleNamespace

    from torch import nn

    from quantkit.errors import QuantkitError
    from quantkit.scale_tuning import tune
    from quantkit.tune_settings import TuneSettings

    class Logits(nn.Module):
        def __init__(self, seed: int):
            super().__init__()
            self.table = nn.Parameter(torch.randn(7, 7, generator=torch.Generator().manual_seed(seed)))

        def forward(self, ids):
            return SimpleNamespace(logits=self.table[ids] * 1e30)

    student, teacher = Logits(0), Logits(1)
    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(QuantkitError, match="KL became") as e:
        tune(student, teacher.requires_grad_(False), ids, [student.table], TuneSettings(steps=3, lr=1e30, batch_size=2))
    assert e.value.field == "--lr" and not student.training


def test_tune_loads_the_base_at_the_runs_revision(tmp_path, monkeypatch):
    """A run of a hub model pinned to a revision is tuned against that revision, not the
    latest; a --base of the user's own is taken as given."""
    import quantkit
    from quantkit.model import ModelSource

    folder = _w4a16_folder(tmp_path)
    (folder / "report.json").write_text(json.dumps({"model": "org/model", "revision": "abc123", "calibration": {
        "source": "shakespeare", "num_samples": 2, "max_seq_length": 16}}))
    opened = []

    def record(model, revision=None, *args, **kwargs):
        opened.append((model, revision))
        raise RuntimeError("stop here")

    monkeypatch.setattr(ModelSource, "open", staticmethod(record))
    for options, expect in (({}, ("org/model", "abc123")), ({"base": "other/model"}, ("other/model", None))):
        with pytest.raises(RuntimeError, match="stop here"):
            quantkit.tune(folder, device="cpu", **options)
        assert opened[-1] == expect


@pytest.mark.parametrize("device,base,per_param", [("cpu", "float32", 5), ("cuda", "bfloat16", 3)])
def test_out_of_device_memory_is_one_error_and_writes_nothing(tmp_path, monkeypatch, device, base, per_param):
    """Running out of memory while the models load or train names --batch-size, says what was
    held (the bf16 base on a GPU, float32 on the CPU) and leaves the folder's shards as they were."""
    import quantkit.evaluate
    from quantkit.errors import DeviceMemoryError
    from quantkit.scale_tuning import tune_checkpoint
    from quantkit.tune_settings import TuneSettings

    folder = _w4a16_folder(tmp_path)
    save_file({"model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))
    original = {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(quantkit.evaluate, "load_for_evaluation", out_of_memory)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    with pytest.raises(DeviceMemoryError, match="nothing was written") as e:
        tune_checkpoint(folder, tmp_path / "base", [torch.zeros(8, dtype=torch.long)], TuneSettings(),
                        torch.device(device))
    assert e.value.field == "--batch-size" and f"about {per_param} bytes a parameter" in str(e.value)
    assert f"base model in {base}" in str(e.value)
    assert {p.name: p.read_bytes() for p in folder.glob("*.safetensors")} == original


@pytest.mark.parametrize("extra,scored,base", [({}, 16, "float32"),
                                               ({"kl_windows": 4, "base_dtype": "bfloat16"}, 4, "bfloat16")])
def test_the_card_says_what_the_kl_and_the_base_perplexity_were_measured_on(extra, scored, base):
    """A report written before the KL was scored on a subset, or the base held in bf16, scored
    both on all windows and in float32; the card says so instead of failing to render."""
    from quantkit.card import _tuning_lines

    tuning = {"base": "m", "steps": 32, "windows": 16, "seq_len": 64, "kl_before": 0.2, "kl_after": 0.1,
              "perplexity_base": 10.0, "perplexity_before": 11.0, "perplexity_tuned": 10.5, **extra}
    text = "\n".join(_tuning_lines(tuning))
    assert f"next-token KL on {scored} of those windows 0.2000 -> 0.1000" in text
    assert f"(base in {base}, the others in float32): base 10.000, quantized 11.000, tuned 10.500" in text
