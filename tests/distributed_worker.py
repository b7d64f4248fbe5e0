"""One rank of tests/test_distributed_quantizers.py: quantize a tiny real decoder layer with
every method on this rank's share of the calibration batches (``torchrun`` sets the world;
run directly it is the world of one) and write what this rank ends with to
``<out>/<case>-rank<r>.safetensors``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from quantkit.scheme import quantized_as_tensors
from quantkit.workdir import write_safetensors

CASES = {
    "gptq": {"method": "gptq", "group_size": 32, "act_order": True},
    "awq": {"method": "awq", "group_size": 32},
    "fp8": {"method": "fp8", "activations": "static", "kv_cache": True},
    "int8-percentile": {"method": "static_int8", "observer": "percentile", "percentile": 99.0},
    "int8-sq-gptq": {"method": "dynamic_int8", "smoothquant_alpha": 0.5, "weight_method": "gptq"},
}


def quantize_case(case: str, world) -> dict[str, torch.Tensor]:
    """Everything the layer ends with: quantized tensors, its (possibly folded) floats, extras."""
    from quantkit.quantizers import QUANTIZERS
    from tests.helpers import FakeCalibration, llama_graph, tiny_llama_layer

    layer, data, cfg = tiny_llama_layer(seed=3, batches=4, outliers=4)
    params = CASES[case]
    cls = QUANTIZERS[params["method"]]
    q = cls(cls.Params(**params), cfg)
    out = q.quantize_layer(layer, llama_graph(), FakeCalibration(layer, data, world))
    tensors, schemes = quantized_as_tensors(out)
    result = {f"q.{k}": v for k, v in tensors.items()}
    result.update({f"float.{k}": v for k, v in layer.state_dict().items()})
    result.update({f"extra.{k}": v for k, v in q.extra_tensors().items()})
    result["schemes"] = torch.frombuffer(bytearray(json.dumps(schemes, sort_keys=True).encode()), dtype=torch.uint8)
    return result


def main(out: Path) -> None:
    from quantkit.distributed import close, world_from_environment

    world = world_from_environment(torch.device("cpu"))
    for case in CASES:
        result = quantize_case(case, world)
        write_safetensors(out / f"{case}-rank{world.rank}.safetensors", result, {})
    close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
