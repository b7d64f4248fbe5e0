"""Perplexity of a saved model or quantized checkpoint, through transformers.

The checkpoint is loaded as a user's own transformers code can load it (``load_for_evaluation``;
lm-eval's tasks take the same model), so this measures the written files, not the run's
in-memory model. For models larger than memory the layerwise engine measures perplexity during
``run`` instead (base and quantized in one streaming pass).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import torch

from .calibration import TextRequest, load_tokens
from .engine import make_batches, perplexity
from .errors import MissingDependencyError, ModelError
from .model import load_tokenizer, read_config, resolve_model_dir
from .shard_check import read_entries


def evaluate_checkpoint(checkpoint: str | Path, source: str = "shakespeare-eval", num_samples: int = 16,
                        max_seq_length: int = 512, batch_size: int = 4,
                        device: torch.device | None = None) -> dict[str, Any]:
    """``device`` None: a GPU where there is one. The result names the device and the dtype
    (``load_for_evaluation``), since perplexities in float32 and bf16 differ in the last digits."""
    from .preflight import resolve_device

    path = resolve_model_dir(str(checkpoint))
    device = resolve_device("auto") if device is None else device
    model, dtype = load_for_evaluation(path, device, name=str(checkpoint))
    tokens = load_tokens(TextRequest(source, num_samples, max_seq_length, True, 0, False), load_tokenizer(path), path)
    ppl = perplexity((model(batch.to(device)).logits[:, :-1], batch) for batch in make_batches(tokens, batch_size))
    return {"checkpoint": str(checkpoint), "perplexity": ppl, "source": source,
            "num_windows": len(tokens), "seq_len": max_seq_length, "device": str(device),
            "dtype": str(dtype).removeprefix("torch.")}


def load_for_evaluation(path: Path, device: torch.device, name: str | None = None,
                        dtype: torch.dtype | None = None) -> tuple[Any, torch.dtype]:
    """A model folder or quantized checkpoint (``path``, resolved; ``name``, what the user
    called it, names it in errors) as transformers loads it, on ``device``, and the dtype it
    computes in: the checkpoint's own on a GPU (what vLLM serves it in), float32 on a CPU (bf16
    matmuls are far slower there), or ``dtype`` (tune loads in the checkpoint's own everywhere
    and casts after dropping the dense weights). Perplexity and lm-eval's tasks load it alike."""
    from transformers import AutoConfig

    from .graph.skeleton import model_class
    from .preflight import compute_dtype, resolve_dtype

    checkpoint = name or str(path)
    config = read_config(path / "config.json", quantized_ok=True)
    if (config.get("quantization_config") or {}).get("transform_config"):
        raise ModelError(f"{checkpoint}: its quantization_config has a transform_config (online_down_proj), "
                         "which vLLM applies at run time and transformers does not: its scores here would be wrong",
                         field="checkpoint", file=path / "config.json",
                         hint="read the perplexity from the run's report.json (measured with the transform); "
                         "for tasks use --backend vllm")
    if any((g.get("input_activations") or {}).get("type") == "float" and g["input_activations"].get("num_bits") == 4
           for g in config_groups(config)):
        raise ModelError(f"{checkpoint}: transformers does not quantize its FP4 activations (NVFP4 W4A4) as vLLM "
                         "does, so its scores here would not be the served model's",
                         field="checkpoint", file=path / "config.json",
                         hint="read the perplexity from the run's report.json (vLLM's arithmetic); "
                         "for tasks use --backend vllm")
    if asymmetric_experts(config):
        raise ModelError(f"{checkpoint}: transformers 5 reads no zero points for a Mixture-of-Experts block's experts, "
                         "so it cannot load this asymmetric checkpoint", field="checkpoint", file=path / "config.json",
                         hint="read the perplexity from the run's report.json; for tasks use --backend vllm, "
                         "which reads them")
    for shard in sorted(path.glob("*.safetensors")):  # a damaged file is one line, not a loader traceback
        read_entries(shard)
    # The class config.json names: a multimodal checkpoint (Qwen2.5-VL) has no causal-LM auto class.
    cls = model_class(AutoConfig.from_pretrained(path, trust_remote_code=False), str(checkpoint))
    dtype = dtype or compute_dtype(device, resolve_dtype("auto", config))
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    with warnings.catch_warnings():  # the option is there to override the checkpoint's own; transformers says so
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        try:
            model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False, **placement,
                                        **decompressed_on_load(config)).eval()
        except ImportError as e:  # the gptq and awq formats load through packages quantkit does not need
            method = (config.get("quantization_config") or {}).get("quant_method")
            raise MissingDependencyError(f"{checkpoint}: transformers cannot load its {method} format here: {e}",
                                         field="checkpoint", value=str(checkpoint),
                                         hint="install what it names, or read the perplexity the run "
                                         "measured in report.json") from None
    return model, dtype


def decompressed_on_load(config: dict[str, Any]) -> dict[str, Any]:
    """transformers' loading option for a compressed-tensors checkpoint of one scheme that
    quantizes weights only: its Linears decompressed as they load.

    They then compute the same products as the compressed modules would, and this is the one
    way transformers 5 with compressed-tensors 0.20 reads asymmetric ``pack-quantized`` and FP4
    weights. For the former its compressed modules are laid out with the zero points unpacked
    (``[out, groups]``) while the checkpoint holds them packed as vLLM reads them (``[out / 8,
    groups]`` at 4 bits), and the load stops on the size mismatch; the latter decompress to
    bf16 inside a float32 model. Schemes that quantize activations keep the compressed modules,
    which quantize them at run time; so do checkpoints of several schemes, whose decompression
    on load fails in transformers (a conversion error) where the compressed modules load.
    """
    if not loads_decompressed(config):
        return {}
    from transformers import CompressedTensorsConfig

    # Later transformers 5 releases name it `dequantize=True` and warn on `run_compressed=False`.
    named = "dequantize" in inspect.signature(CompressedTensorsConfig).parameters
    return {"quantization_config": CompressedTensorsConfig(**({"dequantize": True} if named else
                                                              {"run_compressed": False}))}


def loads_decompressed(config: dict[str, Any]) -> bool:
    """Whether transformers loads a checkpoint of this ``config`` decompressed
    (``decompressed_on_load`` says why): compressed-tensors, one scheme, weights only."""
    groups = config_groups(config)
    return ((config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"
            and len(groups) == 1 and not groups[0].get("input_activations"))


def asymmetric_experts(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's config has Mixture-of-Experts blocks and asymmetric weights:
    transformers 5 decompresses a block's experts without their zero points, so it cannot
    load such a checkpoint either way (vLLM reads them)."""
    from .planner import ModelShape

    return (any(not (g.get("weights") or {}).get("symmetric", True) for g in config_groups(config))
            and ModelShape.from_config(config).num_experts > 0)


def config_groups(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The schemes of a checkpoint's ``quantization_config`` (none for a float model)."""
    return list(((config.get("quantization_config") or {}).get("config_groups") or {}).values())
