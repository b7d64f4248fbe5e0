"""A Mixture-of-Experts model on two gloo ranks against the world of one (issue 17 with
issue 16's experts): the routed token counts and the round-to-nearest fallback are decided
from every rank's tokens, so both ranks take the same decisions; an expert none of rank 1's
tokens reaches still gets the one-rank statistics; GPTQ with input feedback carries each
rank's own float stream. Every rank ends with the same layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.distributed_moe_worker import CASES, NEVER, ONLY_SHORT, quantize_case
from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("moe-ranks")
    model = make_tiny_model(out / "model", arch="qwen3_moe", layers=2, hidden=64, intermediate=128)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    got = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(ROOT / "tests" / "distributed_moe_worker.py"), str(model), str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    return model, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_on_two_ranks_ends_with_the_one_rank_layers(two_ranks, case, tmp_path):
    """Hessians and maxima are reduced over the ranks, so they differ from the one-rank ones by
    float32 summation order only: layer 0's codes flip where a weight sits on a rounding
    boundary (under 1%), its scales agree to 1e-4; layer 1 also sees inputs through those
    flipped codes (under 5%, scales to 1e-3)."""
    from quantkit.distributed import SINGLE

    model, out = two_ranks
    one, report = quantize_case(case, model, tmp_path / "work", SINGLE)
    ranks = [load_file(out / f"{case}-rank{r}.safetensors") for r in (0, 1)]
    reports = [json.loads(safe_open(out / f"{case}-rank{r}.safetensors", framework="pt").metadata()["report"])
               for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == one.keys()
    for k in one:  # every rank holds the same layers, so they all propagate alike
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    for k, ref in one.items():
        got, first = ranks[0][k], k.startswith("0.")
        if k.endswith(".codes"):
            assert (got != ref).float().mean().item() < (0.01 if first else 0.05), k
        elif ref.is_floating_point():
            torch.testing.assert_close(got, ref, rtol=1e-4 if first else 1e-3, atol=1e-6, msg=k)
        else:
            assert torch.equal(got, ref), k
    assert reports[0] == reports[1] == report
    if CASES[case][1].all_experts:
        return
    # Routed calibration: expert 2 was never picked, so both ranks rounded it to nearest;
    # expert 3 was picked only in rank 0's batch and still had its tokens counted and solved.
    assert report["rtn_fallback"] == [f"model.layers.{i}.mlp.experts.{NEVER}.{p}" for i in (0, 1)
                                      for p in ("gate_proj", "up_proj", "down_proj")]
    for i in (0, 1):
        counts = report["routed"][f"model.layers.{i}.mlp.experts"]
        assert counts[NEVER] == 0 and counts[ONLY_SHORT] > 0
