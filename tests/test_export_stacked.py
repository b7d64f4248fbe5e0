"""Linears of one scheme and shape (a layer's experts) are packed as one stack at export: the
checkpoint is byte for byte the one that packing each Linear alone writes, and a NaN, Inf or
zero scale inside a stack is still refused under the exact tensor's name (issue 16 points 3, 6)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from quantkit import checkpoint, export
from quantkit.errors import NumericsError
from quantkit.finite_check import check_quantized_stack, check_written_stack
from quantkit.formats.compressed_tensors import CompressedTensorsFormat
from quantkit.pipeline import run
from quantkit.presets import preset_scheme
from quantkit.quantizers.rtn import quantize_rtn
from quantkit.recipe import make_recipe
from quantkit.scheme import QuantizedWeight
from tests.helpers import family_workspace

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return family_workspace(tmp_path_factory, "stacked")


def _export(base, text, out, quantization: dict) -> dict[str, bytes]:
    run(make_recipe({"model": {"id": str(base)}, "quantization": quantization,
                     "calibration": {"source": str(text), "num_samples": 2, "max_seq_length": 32, "batch_size": 2},
                     "evaluate": {"enabled": False},
                     "export": {"output_dir": str(out), "max_shard_size": "300KB"}, "device": "cpu"}), quiet=True)
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())
            if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json")}


@pytest.mark.parametrize("family,quantization,largest", [
    # asymmetric: zero points are packed along the output dim of each stacked expert; four
    # experts a group, so chunks of three and one
    ("qwen3_moe", {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}, 3),
    # q/o, k/v and gate/up share a shape
    ("llama", {"method": "gptq", "bits": 8, "group_size": 64}, 2),
])
def test_stacked_export_writes_the_per_linear_checkpoint_byte_for_byte(workspace, tmp_path, monkeypatch, family,
                                                                         quantization, largest):
    root, text, model = workspace
    base = model(family)
    per_linear_calls = []
    original = checkpoint.CheckpointWriter.add_quantized
    monkeypatch.setattr(checkpoint.CheckpointWriter, "add_quantized",
                        lambda self, prefix, qw: (per_linear_calls.append(prefix), original(self, prefix, qw))[1])
    with monkeypatch.context() as m:
        m.setattr(CompressedTensorsFormat, "stacks", lambda self, scheme: False)
        alone = _export(base, text, tmp_path / "alone", quantization)
    quantized = len(per_linear_calls)
    per_linear_calls.clear()
    stacks = []
    original_pack = checkpoint.CheckpointWriter.pack_stack
    monkeypatch.setattr(checkpoint.CheckpointWriter, "pack_stack",
                        lambda self, prefixes, qws, stack: (stacks.append(len(prefixes)),
                                                            original_pack(self, prefixes, qws, stack))[1])
    # three Linears a stack at most, so a group splits into chunks and a chunk of one goes alone
    codes_bytes = 128 * 128 if family == "qwen3_moe" else 256 * 128
    monkeypatch.setattr(export, "STACK_BYTES", 3 * codes_bytes)
    stacked = _export(base, text, tmp_path / "stacked", quantization)
    assert stacks and max(stacks) == largest and sum(stacks) + len(per_linear_calls) == quantized
    assert stacked.keys() == alone.keys() and len([f for f in alone if f.endswith(".safetensors")]) > 1
    for name in alone:
        assert stacked[name] == alone[name], name


def _experts(n: int, seed: int) -> list[QuantizedWeight]:
    g = torch.Generator().manual_seed(seed)
    scheme = preset_scheme("W4A16")
    return [quantize_rtn(torch.randn(32, 256, generator=g), scheme) for _ in range(n)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_a_bad_scale_inside_a_stack_is_refused_naming_its_linear(bad):
    qws = _experts(4, seed=1)
    qws[2] = replace(qws[2], scale=qws[2].scale.clone().index_fill_(1, torch.tensor([1]), bad))
    prefixes = [f"model.layers.0.mlp.experts.{i}.down_proj" for i in range(4)]
    with pytest.raises(NumericsError) as err:
        check_quantized_stack(prefixes, qws, export._stack(qws, torch.device("cpu")))
    assert err.value.file == "model.layers.0.mlp.experts.2.down_proj.scale"


@pytest.mark.parametrize("bad", [float("nan"), 0.0])
def test_a_bad_written_tensor_inside_a_stack_is_refused_naming_it(bad):
    scales = torch.rand(5, 8, 2) + 0.5
    scales[3, 7, 1] = bad
    names = [f"model.layers.1.mlp.experts.{i}.gate_proj.weight_scale" for i in range(5)]
    with pytest.raises(NumericsError) as err:
        check_written_stack(names, scales.to(torch.bfloat16))
    assert err.value.file == "model.layers.1.mlp.experts.3.gate_proj.weight_scale"
    check_written_stack(names, torch.rand(5, 8, 2) + 0.5)  # a sound stack passes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("symmetric", [True, False])
def test_stacked_packing_on_the_gpu_is_the_cpu_per_linear_packing(symmetric):
    """The export packs on the run's device: int32 shifts into the sign bit and the scale casts
    on CUDA give the bytes the CPU gives Linear by Linear."""
    from quantkit.scheme import Scheme, WeightScheme

    g = torch.Generator().manual_seed(3)
    scheme = Scheme(WeightScheme(num_bits=4, group_size=128, symmetric=symmetric))
    qws = [quantize_rtn(torch.randn(256, 512, generator=g), scheme) for _ in range(6)]
    fmt = CompressedTensorsFormat()
    prefixes = [f"experts.{i}.up_proj" for i in range(6)]
    stacked = fmt.stacked_tensors(prefixes, export._stack(qws, torch.device("cuda")), torch.bfloat16)
    for i, (prefix, qw) in enumerate(zip(prefixes, qws)):
        for name, t in fmt.weight_tensors(prefix, qw, torch.bfloat16).items():
            got = stacked[name.rpartition(".")[2]][i].cpu()
            assert got.dtype == t.dtype and torch.equal(got, t), name
