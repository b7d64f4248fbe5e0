"""What can be known of a model without its weights: config.json and the safetensors shard
headers (tensor names, dtypes, shapes), from a local or built-in model's folder or from the Hub.

A model on the Hub is not downloaded for this: config.json and the shard headers are fetched
alone (``get_safetensors_metadata`` reads each shard's first bytes); without network the local
Hugging Face cache serves, if it holds the model. A built-in model is converted once on first
use, and an opted-in pickle model once to safetensors (both cached), before their headers exist.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError
from .model import ModelSource, cached_hub_model_dir, local_model_dir, unreachable_hub_model


@dataclass(frozen=True)
class ModelFiles:
    """What validation reads of a model: config.json and its safetensors shard headers."""

    location: str  # the local folder, or the hub id (and revision)
    config: dict[str, Any]
    headers: dict[str, dict[str, Any]]  # tensor name -> dtype, shape, data_offsets
    shards: int
    shard_bytes: int
    remote: bool  # on the Hub and not downloaded


def model_files(model: str, revision: str | None, allow_pickle: bool, token: str | None) -> ModelFiles:
    """config.json and the shard headers of a local or built-in model, or of a hub model
    without downloading its weights (from the local cache when the Hub cannot be reached)."""
    folder = local_model_dir(model)
    if folder is None:
        try:
            return _hub_files(model, revision, token)
        except ModelError:
            folder = cached_hub_model_dir(model, revision)
            if folder is None or not any(folder.glob("*.safetensors")):
                raise
    source = ModelSource.open(str(folder), None, allow_pickle)
    shards = sorted(set(source.weight_map.values()))
    return ModelFiles(str(source.path), source.config, source.tensor_headers(), len(shards),
                      sum((source.path / s).stat().st_size for s in shards), remote=False)


def _hub_files(repo_id: str, revision: str | None, token: str | None) -> ModelFiles:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        SafetensorsParsingError,
    )

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    try:
        config_file = Path(api.hf_hub_download(repo_id, "config.json", revision=revision))
        meta = api.get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError:
        raise ModelError(f"model.id: '{repo_id}' has no safetensors weights on the Hub", field="model.id",
                         value=repo_id, hint="quantkit downloads safetensors only: convert the model, or download "
                         "it and set model.allow_pickle: true") from None
    except SafetensorsParsingError as e:
        raise ModelError(f"model.id: '{repo_id}': a shard header on the Hub is not readable ({e})",
                         field="model.id", value=repo_id) from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise unreachable_hub_model(repo_id, e) from None
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model.id: {repo_id}'s config.json is not valid JSON ({e})", field="model.id",
                         value=repo_id, file=config_file) from None
    headers = {name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
               for f in meta.files_metadata.values() for name, t in f.tensors.items()}
    data_bytes = sum(max((t.data_offsets[1] for t in f.tensors.values()), default=0)
                     for f in meta.files_metadata.values())
    location = repo_id + (f"@{revision}" if revision else "")
    return ModelFiles(location, config, headers, len(meta.files_metadata), data_bytes, remote=True)
