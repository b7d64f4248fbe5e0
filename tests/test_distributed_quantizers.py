"""Every method on two gloo ranks (each calibrating half the batches) against the world of
one: statistics reduce to what one rank would have seen, every rank ends with the same
layer, and methods whose statistics are exact (maxima, percentiles of the pooled values)
agree bitwise; the rest within float32 summation order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_worker import CASES, hessian_inputs, quantize_case, sent_tensors

ROOT = Path(__file__).resolve().parent.parent
EXACT = {"fp8", "int8-percentile"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    got = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(ROOT / "tests" / "distributed_worker.py"), str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_end_with_the_one_rank_layer(two_ranks, case):
    from quantkit.distributed import SINGLE

    one = quantize_case(case, SINGLE)
    r0, r1 = (load_file(two_ranks / f"{case}-rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() == one.keys()
    for k in r0:  # every rank holds the same weights, so they all propagate the same layer
        assert torch.equal(r0[k], r1[k]), k
    for k, ref in one.items():
        got = r0[k]
        if case in EXACT or k == "schemes" or not ref.is_floating_point() and not k.endswith(".codes"):
            assert torch.equal(got, ref), k
        elif k.endswith(".codes"):  # a code may flip where w/s sits on a rounding boundary
            assert (got != ref).float().mean().item() < 0.01, k
        else:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=k)


def test_broadcast_carries_any_dtype_and_metadata(two_ranks):
    from safetensors import safe_open

    for r in (0, 1):
        path = two_ranks / f"broadcast-rank{r}.safetensors"
        got = load_file(path)
        for k, ref in sent_tensors().items():
            assert got[k].dtype == ref.dtype and got[k].shape == ref.shape, k
            assert torch.equal(got[k].reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), k
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["meta"] == '{"from": 1}'


def test_hessian_reduces_with_a_rank_that_saw_no_token(two_ranks):
    from safetensors import safe_open

    x = torch.cat(hessian_inputs()).double()
    ref = 2 * x.T @ x / x.shape[0]
    for r in (0, 1):
        path = two_ranks / f"hessian-rank{r}.safetensors"
        torch.testing.assert_close(load_file(path)["h"].double(), ref, rtol=1e-5, atol=1e-6)
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["tokens"] == str(x.shape[0])


def test_hessian_with_an_owner_lives_on_that_rank_alone(two_ranks):
    """An expert's Hessian only its owner solves with is reduced to the owner (rank 1, which
    saw none of the tokens): the whole Hessian there, nothing left on rank 0."""
    x = torch.cat(hessian_inputs()).double()
    owner, other = (load_file(two_ranks / f"owned-rank{r}.safetensors") for r in (1, 0))
    torch.testing.assert_close(owner["h"].double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert other == {}


def test_absmax_reduces_with_a_rank_that_saw_no_token(two_ranks):
    """Rank 1 saw none of the inputs (an expert none of its tokens reached): the maxima are rank
    0's, of the right shape; one no rank saw stays without a statistic."""
    from safetensors import safe_open

    x = torch.cat(hessian_inputs())
    for r in (0, 1):
        path = two_ranks / f"absmax-rank{r}.safetensors"
        got = load_file(path)
        assert torch.equal(got["scalar"], x.abs().amax()) and torch.equal(got["channels"], x.abs().amax(0))
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["none"] == '["nobody"]'
