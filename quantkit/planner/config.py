"""config.json of the model to plan: a local folder or file, a built-in model, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelError


def load_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """config.json of a local folder (or the file itself), else of a hub repo id.

    Only config.json is fetched from the Hub (``hf_hub_download``); nothing else is read.
    Built-in models (``builtin:smollm2-135m``) and local GGUF files are resolved to their
    converted folder.
    """
    if model.startswith("builtin:") or model.endswith(".gguf"):
        from ..model import local_model_dir

        model = str(local_model_dir(model))
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelError(f"{path}: no config.json in this folder", field="model", value=model, file=path)
    elif not path.is_file():
        if model.startswith((".", "/", "~")) or model.count("/") > 1:
            raise ModelError(f"model: {model} is not a folder with config.json", field="model", value=model,
                             file=path)
        path = _download_config(model, revision)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read as JSON ({e})", field="model", value=model, file=path) from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object", field="model", value=model, file=path)
    return config


def _download_config(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelError(
            f"model: cannot get config.json of '{repo_id}' (not a local folder; Hub said {type(e).__name__})",
            field="model", value=repo_id, hint="check the path, the id, or your network/HF_TOKEN") from None

