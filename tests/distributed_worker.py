"""One rank of tests/test_distributed_quantizers.py: quantize a tiny real decoder layer with
every method on this rank's share of the calibration batches (``torchrun`` sets the world;
run directly it is the world of one) and write what this rank ends with to
``<out>/<case>-rank<r>.safetensors``."""

from __future__ import annotations

import json
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
    # NVFP4: input global scales reduce by MAX, q/k/v and gate/up share a weight global scale;
    # one Linear on its own scheme, one left float.
    "gptq-nvfp4-mixed": {"method": "gptq", "scheme": "NVFP4", "ignore": ["re:.*o_proj$"],
                         "overrides": [{"targets": ["re:.*down_proj$"], "bits": 4, "group_size": 32}]},
}


def quantize_case(case: str, world) -> dict[str, torch.Tensor]:
    """Everything the layer ends with: quantized tensors, its (possibly folded) floats, extras."""
    from quantkit.quantizers import QUANTIZERS
    from tests.helpers import FakeCalibration, llama_graph, tiny_llama_layer

    layer, data, cfg = tiny_llama_layer(seed=3, batches=4, outliers=4)
    params = CASES[case]
    cls = QUANTIZERS[params["method"]]
    q = cls(cls.Params(**params), cfg)
    graph = llama_graph()
    out = q.quantize_layer(layer, graph, FakeCalibration(layer, data, world=world),
                           q.layer_schemes("model.layers.0.", graph))
    tensors, schemes = quantized_as_tensors(out)
    result = {f"q.{k}": v for k, v in tensors.items()}
    result.update({f"float.{k}": v for k, v in layer.state_dict().items()})
    result.update({f"extra.{k}": v for k, v in q.extra_tensors().items()})
    result["schemes"] = torch.frombuffer(bytearray(json.dumps(schemes, sort_keys=True).encode()), dtype=torch.uint8)
    return result


def sent_tensors() -> dict[str, torch.Tensor]:
    """What rank 1 broadcasts: dtypes gloo cannot reduce (float8, bool), a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return {"fp8": torch.randn(3, 5, generator=g).to(torch.float8_e4m3fn), "mask": torch.rand(7, generator=g) > 0.5,
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4, dtype=torch.int32),
            "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16)}


def hessian_inputs() -> list[torch.Tensor]:
    """Batches for a Hessian that rank 0 sees three of and rank 1 none (an expert no token
    of rank 1 picked)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 8, generator=g) for n in (5, 11, 3)]


def main(out: Path) -> None:
    from quantkit.distributed import close, world_from_environment

    world = world_from_environment(torch.device("cpu"))
    for case in CASES:
        result = quantize_case(case, world)
        write_safetensors(out / f"{case}-rank{world.rank}.safetensors", result, {})
    from quantkit.quantizers.hessian import HessianAccumulator

    acc = HessianAccumulator("expert", in_features=8)
    for x in hessian_inputs() if world.rank == 0 else []:
        acc.add(x)
    acc.reduce(world)
    write_safetensors(out / f"hessian-rank{world.rank}.safetensors", {"h": acc.hessian()}, {"tokens": str(acc.tokens)})
    owned = HessianAccumulator("expert", in_features=8)
    owned.owner = 1
    for x in hessian_inputs() if world.rank == 0 else []:
        owned.add(x)
    owned.reduce(world)
    try:
        kept = {"h": owned.hessian()}
    except RuntimeError:
        kept = {}
    write_safetensors(out / f"owned-rank{world.rank}.safetensors", kept, {"tokens": str(owned.tokens)})
    from quantkit.quantizers.observers import AbsMax

    maxima = {"scalar": AbsMax(), "channels": AbsMax(per_channel=8), "nobody": AbsMax(per_channel=8)}
    for x in hessian_inputs() if world.rank == 0 else []:
        maxima["scalar"].add(x)
        maxima["channels"].add(x)
    for m in maxima.values():
        m.reduce(world)
    write_safetensors(out / f"absmax-rank{world.rank}.safetensors",
                      {k: m.amax for k, m in maxima.items() if m.amax is not None},
                      {"none": json.dumps(sorted(k for k, m in maxima.items() if m.amax is None))})
    got, meta = world.broadcast(sent_tensors() if world.rank == 1 else None, 1, {"from": 1})
    write_safetensors(out / f"broadcast-rank{world.rank}.safetensors", got, {"meta": json.dumps(meta)})
    close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
