"""One rank of tests/test_distributed_moe.py: the engine quantizes a tiny two-layer Qwen3-MoE
(or Llama 4, its second layer MoE: ``FAMILIES``) on this rank's share of two calibration
batches (``torchrun`` sets the world; called with ``SINGLE`` it is the world of one) and writes
every layer it ends with, and its expert report, to ``<out>/<case>-rank<r>.safetensors``, with
what the rank held: which Hessians it ever allocated and how many calibration passes each layer
took (``probe``).

The router never picks expert 2, and picks expert 3 only in the batch of shorter sequences:
on two ranks rank 0 holds that batch and rank 1 the other, so no token of rank 1 reaches
expert 3 (its statistics there are empty) while expert 2 falls back to round-to-nearest."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from quantkit.moe import ExpertCalibration
from tests.helpers import mask_llama4_router, mask_router

SHORT, LONG = 12, 16  # the two batches' sequence lengths (two sequences each)
NEVER, ONLY_SHORT = 2, 3
CASES = {
    # Routed calibration: expert 2 (no token anywhere) falls back to RTN, expert 3 gets GPTQ from
    # rank 0's tokens alone; NVFP4's input global scales are maxima over the experts' inputs.
    "routed-nvfp4": ({"method": "gptq", "scheme": "NVFP4"}, ExpertCalibration(False, 1)),
    # AWQ's token samples and |x| means from rank 0's tokens alone for expert 3.
    "routed-awq": ({"method": "awq", "group_size": 32, "grid": 4, "max_calib_tokens": 64}, ExpertCalibration(False, 1)),
    # All-expert calibration: every expert's gate/up share one Hessian, solved in parts across ranks.
    "all-experts": ({"method": "gptq", "group_size": 32}, ExpertCalibration(True)),
    # GPTAQ: the float stream beside the quantized one, each rank carrying its own batches'; each
    # expert's two Hessians on its owner alone, under the two experts' budget (as below).
    "input-feedback": ({"method": "gptq", "group_size": 32, "input_feedback": True}, ExpertCalibration(True)),
    # GPTAQ under routed calibration: from layer 1 on the two streams' routers pick different
    # tokens; an expert's pairs are each token's two inputs, routed as the quantized stream.
    "routed-feedback": ({"method": "gptq", "group_size": 32, "input_feedback": True}, ExpertCalibration(False, 1)),
    # Sequential GPTAQ: the experts' down_proj sees their gate/up quantized on the quantized
    # stream, for the tokens other ranks' experts record and replay too (each stream's as its
    # passes ran it); both streams resume after the attention.
    "feedback-sequential": ({"method": "gptq", "group_size": 32, "input_feedback": True, "sequential": True},
                            ExpertCalibration(True)),
    # A statistics budget of two experts' own (down_proj) Hessians, the first pass holding the
    # common ones and expert 0 beyond it: one rank needs 3 passes, two ranks (each holding only
    # its own experts': two per pass) 2.
    "all-experts-chunked": ({"method": "gptq", "group_size": 32}, ExpertCalibration(True)),
}
TWO_EXPERTS_BUDGET = {"all-experts-chunked", "input-feedback"}


@dataclass(frozen=True)
class Family:
    """How a family's tiny model is run: its MoE block in a layer, which layers have one, how
    its router is masked (given the layer), and its cases."""

    block: str
    moe_layers: tuple[int, ...]
    mask: Callable[[torch.nn.Module, Callable[[torch.Tensor], tuple[int, ...]]], None]
    cases: tuple[str, ...]
    budget: bool  # TWO_EXPERTS_BUDGET applies


FAMILIES = {
    "qwen3_moe": Family("mlp", (0, 1), lambda layer, masked: mask_router(layer.mlp.gate, masked), tuple(CASES), True),
    # Llama 4's experts read router-scaled inputs, their calls recorded as the block's input
    # and the router logits; each expert reads its own tensor (no shared gate/up Hessian).
    "llama4_text": Family("feed_forward", (1,),
                          lambda layer, masked: mask_llama4_router(layer.feed_forward.router, masked),
                          ("all-experts", "routed-nvfp4", "input-feedback", "routed-feedback"), False),
}


def family_of(model: Path) -> Family:
    return FAMILIES[json.loads((model / "config.json").read_text())["model_type"]]


def calibration_ids() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=g) for n in (SHORT, SHORT, LONG, LONG)]


def two_experts_budget(graph) -> int:
    """Bytes of two of ``graph``'s experts' own statistics (their down_proj's float32
    ``[in, in]`` Hessian, as ``moe.statistics_chunks`` counts them)."""
    return 2 * 4 * graph.unit("mlp.experts.0.down_proj").in_features ** 2


def quantize_case(case: str, model: Path, work: Path, world) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Every layer's quantized tensors (``<layer>.<name>.<tensor>``), the expert report, and
    what this rank held (``held``: every Hessian that had memory on this rank, by group key;
    ``passes``: calibration passes per layer)."""
    from unittest import mock

    from quantkit import engine as engine_module
    from quantkit.engine import LayerwiseEngine
    from quantkit.quantizers.hessian import HessianAccumulator
    from quantkit.graph.runtime import ModelRunner
    from quantkit.model import ModelSource
    from quantkit.quantizers import QUANTIZERS
    from quantkit.scheme import quantized_as_tensors
    from quantkit.workdir import WorkDir
    params, experts = CASES[case]
    family = family_of(model)
    runner = ModelRunner(ModelSource.open(str(model)), torch.device("cpu"), torch.float32)
    load = runner.load_layer

    def routed_layer(i: int):
        layer = load(i)
        if i in family.moe_layers:  # expert 2 never picked; expert 3 never in the long batch
            family.mask(layer, lambda h: (NEVER, ONLY_SHORT) if h.shape[0] == 2 * LONG else (NEVER,))
        return layer

    runner.load_layer = routed_layer
    cls = QUANTIZERS[params["method"]]
    quantizer = cls(cls.Params(**params), {})
    held: set[str] = set()
    passes: dict[int, int] = {}

    def holding(method):
        def call(acc, *args):
            method(acc, *args)
            if acc._h is not None:
                held.add(acc.name)
        return call

    quantize_layer = quantizer.quantize_layer

    def counted(layer, graph, calib, schemes=None):
        passes[calib.index] = passes.get(calib.index, 0) + 1
        return quantize_layer(layer, graph, calib, schemes)

    quantizer.quantize_layer = counted
    # GPTAQ keeps two matrices per input (the quantized inputs' Hessian and the cross term).
    budget = two_experts_budget(runner.graph.layer(0)) * (2 if params.get("input_feedback") else 1) \
        if family.budget and case in TWO_EXPERTS_BUDGET else None
    workdir = WorkDir(work)
    workdir.start(case, False, {}, model)
    got: dict[str, torch.Tensor] = {}

    def on_layer(i, _layer, quantized) -> None:
        tensors, schemes = quantized_as_tensors(dict(quantized))
        got.update({f"{i}.{k}": v for k, v in tensors.items()})
        got[f"{i}.schemes"] = torch.frombuffer(bytearray(json.dumps(schemes, sort_keys=True).encode()),
                                               dtype=torch.uint8)

    engine = LayerwiseEngine(runner, quantizer, workdir, case, quiet=True, on_layer=on_layer, seed=0,
                             experts=experts, world=world)
    with mock.patch.object(HessianAccumulator, "add", holding(HessianAccumulator.add)), \
            mock.patch.object(HessianAccumulator, "reduce", holding(HessianAccumulator.reduce)), \
            mock.patch.object(engine_module, "statistics_budget", lambda _device, _world: budget):
        result = engine.run(calibration_ids(), None, 2)
    report = result.experts
    return got, {"routed": report.routed, "statistics_tokens": report.statistics_tokens,
                 "rtn_fallback": report.rtn_fallback}, {"held": sorted(held), "passes": passes}


def main(model: Path, out: Path) -> None:
    from quantkit.distributed import close, world_from_environment
    from quantkit.workdir import write_safetensors

    world = world_from_environment(torch.device("cpu"))
    for case in family_of(model).cases:
        tensors, report, probe = quantize_case(case, model, out / f"work-{case}-{world.rank}", world)
        write_safetensors(out / f"{case}-rank{world.rank}.safetensors", tensors,
                          {"report": json.dumps(report), "probe": json.dumps(probe)})
    close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
