"""CheckpointWriter streams tensors into shards: files safetensors reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from quantkit import checkpoint
from quantkit.checkpoint import CheckpointWriter
from quantkit.formats import FORMATS


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b.i32": torch.arange(7, dtype=torch.int32),
            "c.f32": torch.randn(4, generator=g), "d.fp8": torch.randn(2, 3, generator=g).to(torch.float8_e4m3fn),
            "e.i8": torch.tensor([-3, 4], dtype=torch.int8), "f.empty": torch.zeros(0, 4),
            "g.scalar": torch.tensor(2.5)}


@pytest.mark.parametrize("room", [checkpoint.HEADER_ROOM, 256])  # 256: two or three entries a shard
@pytest.mark.parametrize("shard", [10**9, 40])
def test_streamed_shards_read_back_exactly(tmp_path, monkeypatch, room, shard):
    monkeypatch.setattr(checkpoint, "HEADER_ROOM", room)
    w = CheckpointWriter(tmp_path / "out", tmp_path / "stage", FORMATS["compressed-tensors"](), torch.bfloat16,
                         shard, overwrite=False)
    w.start()
    want = _tensors()
    for k, v in want.items():
        w.add(k, v, keep_dtype=True)
    w.finalize({"model_type": "llama"}, {}, [])
    got = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            got.update({k: st.get_tensor(k) for k in st.keys()})
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)), k
    assert w.total_bytes == sum(v.numel() * v.element_size() for v in want.values())
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    # Every header sits in the room reserved for it: no shard was rewritten behind a longer one.
    assert {int.from_bytes(f.read_bytes()[:8], "little") for f in shards} == {room - 8}
    assert len(shards) >= (3 if room < 1024 or shard < 100 else 1)


def test_tensor_copied_byte_for_byte_from_a_source_file(tmp_path):
    from safetensors.torch import save_file

    src = {"x": torch.randn(5, 3).to(torch.bfloat16), "emb": torch.randn(7, 4).to(torch.bfloat16)}
    save_file(src, str(tmp_path / "src.safetensors"))
    from quantkit.model import ModelSource

    source = ModelSource(path=tmp_path, config={}, weight_map={"x": "src.safetensors", "emb": "src.safetensors"})
    w = CheckpointWriter(tmp_path / "out", tmp_path / "stage", FORMATS["compressed-tensors"](), torch.bfloat16,
                         10**9, overwrite=False)
    w.start()
    w.add("first", torch.arange(3, dtype=torch.int32))
    path, dtype, shape, start, end = source.tensor_location("emb")
    assert (dtype, shape) == ("BF16", [7, 4])
    w.add_file_range("model.emb", dtype, shape, path, start, end)
    w.finalize({"model_type": "llama"}, {}, [])
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as st:
        assert torch.equal(st.get_tensor("model.emb"), src["emb"])
        assert torch.equal(st.get_tensor("first"), torch.arange(3, dtype=torch.int32))


def test_float_overflowing_the_export_dtype_is_refused_by_name(tmp_path):
    """A finite float32 tensor that float16 cannot hold names itself and the dtype field; one
    already non-finite is refused as damaged instead; nothing of either reaches a shard."""
    from quantkit.errors import ExportError, NumericsError

    w = CheckpointWriter(tmp_path / "out", tmp_path / "stage", FORMATS["compressed-tensors"](), torch.float16,
                         10**9, overwrite=False)
    w.start()
    w.add("fits.weight", torch.tensor([1.0, -65504.0]))
    with pytest.raises(ExportError, match="big.weight overflows float16") as err:
        w.add("big.weight", torch.tensor([1.0, 1e6]))
    assert err.value.field == "model.dtype"
    with pytest.raises(NumericsError, match="nan.weight contains NaN or Inf"):
        w.add("nan.weight", torch.tensor([1.0, float("nan")]))
    w.finalize({"model_type": "llama"}, {}, [])
    with safe_open(next((tmp_path / "out").glob("*.safetensors")), framework="pt") as st:
        assert list(st.keys()) == ["fits.weight"] and st.get_tensor("fits.weight").dtype == torch.float16
