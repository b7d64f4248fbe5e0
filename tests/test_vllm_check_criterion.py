"""The vLLM acceptance rule (quantkit.vllm_acceptance) on made-up scores: vLLM may pick another
token only where the reference's own lead is a near-tie. The benchmark that runs vLLM
(benchmarks/vllm_check.py) only feeds the rule and prints its verdicts."""

from __future__ import annotations

from quantkit.vllm_acceptance import TIE_FLOOR, judge

from .helpers import load_vllm_check


def _reference(margins, low_shift=0.02, top=(5, 6, 7, 8)):
    lp = [-0.5, -1.0, -0.7, -0.2]
    return {"reference": [[5, 6, 7, 8]], "ref_top": [list(top)], "ref_logprob": [lp], "ref_margin": [list(margins)],
            "ref_low_logprob": [[x + low_shift for x in lp]]}


def _served(top):
    return {"tokens": [list(top)], "forced_top": [list(top)], "forced_logprob": [[-0.51, -1.01, -0.71, -0.21]]}


def test_flip_at_a_near_tie_passes():
    verdict = judge(_reference([2.0, 1.5, 0.03, 3.0]), _served([5, 6, 9, 8]))
    assert verdict.passed and verdict.near_tie_flips == 1 and verdict.hard_flips == 0
    assert verdict.agree == 3 and verdict.total == 4 and verdict.prefix_lens == [2]
    assert verdict.tie == TIE_FLOOR  # the reference's own dtype noise (0.02) is below the floor


def test_flip_at_a_confident_position_fails():
    verdict = judge(_reference([2.0, 1.5, 0.9, 3.0]), _served([5, 6, 9, 8]))
    assert not verdict.passed and verdict.hard_flips == 1


def test_tie_threshold_grows_with_the_references_own_dtype_noise():
    # Computing the reference in bf16 moved a log-prob by 0.5: leads below 1.0 are near-ties.
    verdict = judge(_reference([2.0, 1.5, 0.9, 3.0], low_shift=0.5), _served([5, 6, 9, 8]))
    assert verdict.tie == 1.0 and verdict.passed


def test_compares_most_likely_tokens_not_the_greedy_continuation():
    # Generation with a minimum length masks end-of-sequence (id 2); scoring does not: where
    # the reference's own top token is 2, vLLM choosing 2 is agreement.
    verdict = judge(_reference([2.0, 1.5, 2.7, 3.0], top=(5, 6, 2, 8)), _served([5, 6, 2, 8]))
    assert verdict.passed and verdict.agree == 4 and verdict.prefix_lens == [2]


def test_benchmark_rows_carry_the_verdict_and_a_checkpoint_vllm_refused_fails(tmp_path):
    check = load_vllm_check()
    case = {"label": "W4A16", "format": "compressed-tensors", "dir": str(tmp_path / "ckpt"),
            "stem": str(tmp_path / "c"), **_reference([2.0, 1.5, 0.03, 3.0])}
    loaded = {"cases": {"ok": {**case, "vllm": {"loads": True, **_served([5, 6, 9, 8])}},
                        "refused": {**case, "vllm": {"loads": False, "error": "ValueError: no kernel"}}}}
    ok, refused = check.evaluate(loaded)
    assert ok["passed"] and ok["hard_flips"] == 0 and ok["agree"] == 3
    assert not refused["passed"] and "agree" not in refused
    table = check.table([ok, refused])
    assert "| yes |" in table and "no kernel" in table
