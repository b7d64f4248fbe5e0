"""The hub code paths of a run, offline: the base model is downloaded by its hub id and the
result is pushed by the recipe's ``push:`` section, both through the real huggingface_hub
client talking to the local stand-in Hub (tests/hub_server.py)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, snapshot_download

import quantkit
from tests.test_hub import TOKEN, USER, hub  # noqa: F401  (fixture)


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return hub


def test_download_by_hub_id_quantize_and_push(hub_env, tiny_llama, text_file, tmp_path):
    api = HfApi(endpoint=hub_env.endpoint, token=TOKEN)
    api.create_repo(f"{USER}/tiny-base")
    api.upload_folder(folder_path=str(tiny_llama), repo_id=f"{USER}/tiny-base")

    out = tmp_path / "out"
    report = quantkit.quantize(
        model=f"{USER}/tiny-base",
        quantization={"method": "gptq", "group_size": 64},
        calibration={"source": str(text_file), "num_samples": 4, "max_seq_length": 32},
        evaluate={"enabled": False},
        export={"output_dir": str(out)},
        push={"repo_id": f"{USER}/tiny-w4a16", "commit_message": "quantkit test"},
        quiet=True,
    )
    assert report["model"] == f"{USER}/tiny-base"
    assert f"vllm serve {USER}/tiny-w4a16" in report["serve_command"]
    back = Path(snapshot_download(f"{USER}/tiny-w4a16", token=TOKEN, cache_dir=str(tmp_path / "dl"),
                                     endpoint=hub_env.endpoint))
    local = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in back.iterdir() if p.name != ".gitattributes") == local
    for name in local:
        assert (out / name).read_bytes() == (back / name).read_bytes(), name
    assert hub_env.state.commit_count(f"{USER}/tiny-w4a16") == 2  # the repo's initial commit + one push
    assert TOKEN not in (out / "report.json").read_text() + (out / "README.md").read_text()
