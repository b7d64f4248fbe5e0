"""The export runs beside the engine: each layer is written from its record in memory while
the next layer is computed, one layer at a time, and its errors stop the run."""

from __future__ import annotations

import threading

import pytest
import torch

from quantkit import export, pipeline
from quantkit.errors import ExportError, NumericsError
from quantkit.quantizers import QUANTIZERS
from quantkit.recipe import make_recipe
from quantkit.workdir import WorkDir
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("stream") / "m", layers=3, hidden=64, intermediate=128)


def _run(model, out, on_layer=None):
    recipe = make_recipe({"model": {"id": str(model)}, "quantization": {"method": "rtn", "group_size": 64},
                          "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}})
    return pipeline.run(recipe, quiet=True, on_layer=on_layer)


def _export_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("quantkit-export")]


def test_each_layer_is_exported_in_the_background_before_the_next_is_handed_over(three_layers, tmp_path,
                                                                                  monkeypatch):
    events: list[tuple[str, int]] = []
    real = export.export_layer

    def logged(runner, writer, i, record, *a):
        assert threading.current_thread() is not threading.main_thread()
        events.append(("export starts", i))
        try:
            return real(runner, writer, i, record, *a)
        finally:
            events.append(("export ends", i))

    monkeypatch.setattr(export, "export_layer", logged)
    monkeypatch.setattr(WorkDir, "load_layer", lambda *a: pytest.fail("a fresh run read a layer back"))
    report = _run(three_layers, tmp_path / "out", on_layer=lambda i, *_: events.append(("layer done", i)))
    # At most one finished layer waits: layer i goes on only once layer i - 1 is written.
    for i in range(1, 3):
        assert events.index(("export ends", i - 1)) < events.index(("layer done", i)), events
    assert [i for what, i in events if what == "export starts"] == [0, 1, 2]
    assert set(report["timing"]["phase_seconds"]) >= {"export hand-off", "export"}
    assert (tmp_path / "out" / "model.safetensors").is_file() and not _export_threads()


def test_export_error_stops_the_run_at_the_next_hand_off(three_layers, tmp_path, monkeypatch):
    done: list[int] = []

    def fails(runner, writer, i, record, *a):
        raise ExportError(f"layer {i} does not fit", file="shard")

    monkeypatch.setattr(export, "export_layer", fails)
    with pytest.raises(ExportError) as e:
        _run(three_layers, tmp_path / "out", on_layer=lambda i, *_: done.append(i))
    assert (e.value.message, e.value.file) == ("layer 0 does not fit", "shard")
    assert done == [0]  # raised by layer 1's hand-off, before layer 1 went on
    assert not (tmp_path / "out").exists() and not _export_threads()


def test_failed_layer_ends_the_export_thread_and_keeps_finished_layers(three_layers, tmp_path, monkeypatch):
    real, calls = QUANTIZERS["rtn"].quantize_layer, []

    def fails_at_layer_2(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise NumericsError("layer 2 went wrong", field="quantization")
        return real(self, *a, **k)

    monkeypatch.setattr(QUANTIZERS["rtn"], "quantize_layer", fails_at_layer_2)
    with pytest.raises(NumericsError) as e:
        _run(three_layers, tmp_path / "out")
    assert e.value.message == "layer 2 went wrong"
    work = tmp_path / ".out.quantkit-partial"
    assert sorted(p.name for p in (work / "layers").iterdir()) == ["00000.safetensors", "00001.safetensors"]
    assert not (tmp_path / "out").exists() and not _export_threads()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_layers_exported_from_memory_and_from_the_work_folder_give_the_same_bytes(tmp_path, monkeypatch, device):
    """A fresh run exports each MoE layer from its record in memory (on CUDA: codes on the
    device, packed on the export's own stream); a resume after every layer was finished exports
    them all from the work folder. Both write the same files byte for byte."""
    model = make_tiny_model(tmp_path / "moe", arch="qwen3_moe", layers=2)

    def run(out, resume=False):
        recipe = make_recipe({"model": {"id": str(model)}, "quantization": {"method": "rtn", "group_size": 64},
                              "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": device})
        pipeline.run(recipe, quiet=True, resume=resume)

    run(tmp_path / "fresh")

    def dies(*a):
        raise RuntimeError("killed after the last layer")

    with monkeypatch.context() as m:
        m.setattr(export.StreamingExport, "finish", dies)
        with pytest.raises(RuntimeError, match="killed after the last layer"):
            run(tmp_path / "resumed")
    read, load = [], WorkDir.load_layer
    monkeypatch.setattr(WorkDir, "load_layer", lambda self, i: read.append(i) or load(self, i))
    run(tmp_path / "resumed", resume=True)
    assert read == [0, 1]
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "fresh").glob("*.safetensors")}
    assert fresh and fresh == {p.name: p.read_bytes() for p in (tmp_path / "resumed").glob("*.safetensors")}
