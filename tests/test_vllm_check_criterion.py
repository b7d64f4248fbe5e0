"""The vLLM check's decision rule (benchmarks/vllm_check.py ``evaluate``) on made-up scores:
vLLM may pick another token only where the reference's own lead is a near-tie."""

from __future__ import annotations

from .helpers import load_vllm_check

def _state(tmp_path, vllm_top, margins, low_shift=0.02):
    ref = [[5, 6, 7, 8]]  # also the reference's top tokens here
    lp = [[-0.5, -1.0, -0.7, -0.2]]
    case = {"label": "W4A16", "format": "compressed-tensors", "dir": str(tmp_path / "ckpt"), "stem": str(tmp_path / "c"),
            "reference": ref, "ref_top": ref, "ref_logprob": lp, "ref_margin": [margins],
            "ref_low_logprob": [[x + low_shift for x in lp[0]]],
            "vllm": {"loads": True, "tokens": [vllm_top], "forced_top": [vllm_top],
                     "forced_logprob": [[x - 0.01 for x in lp[0]]]}}
    return {"cases": {"c": case}}

def test_flip_at_a_near_tie_passes(tmp_path):
    check = load_vllm_check()
    (row,) = check.evaluate(_state(tmp_path, [5, 6, 9, 8], [2.0, 1.5, 0.03, 3.0]))
    assert row["passed"] and row["near_tie_flips"] == 1 and row["hard_flips"] == 0
    assert row["agree"] == 3 and row["prefix_lens"] == [2]
    assert "yes" in check.table([row])

def test_flip_at_a_confident_position_fails(tmp_path):
    check = load_vllm_check()
    (row,) = check.evaluate(_state(tmp_path, [5, 6, 9, 8], [2.0, 1.5, 0.9, 3.0]))
    assert not row["passed"] and row["hard_flips"] == 1

def test_tie_threshold_grows_with_the_references_own_dtype_noise(tmp_path):
    check = load_vllm_check()
    # Computing the reference in bf16 moved a log-prob by 0.5: leads below 1.0 are near-ties.
    (row,) = check.evaluate(_state(tmp_path, [5, 6, 9, 8], [2.0, 1.5, 0.9, 3.0], low_shift=0.5))
    assert row["tie"] == 1.0 and row["passed"]

def test_not_loaded_fails(tmp_path):
    check = load_vllm_check()
    state = _state(tmp_path, [5, 6, 7, 8], [1.0] * 4)
    state["cases"]["c"]["vllm"] = {"loads": False, "error": "ValueError: no kernel"}
    (row,) = check.evaluate(state)
    assert not row["passed"] and "no kernel" in check.table([row])

def test_compares_most_likely_tokens_not_the_greedy_continuation(tmp_path):
    # Generation with a minimum length masks end-of-sequence (id 2); scoring does not: where
    # the reference's own top token is 2, vLLM choosing 2 is agreement.
    check = load_vllm_check()
    state = _state(tmp_path, [5, 6, 2, 8], [2.0, 1.5, 2.7, 3.0])
    state["cases"]["c"]["ref_top"] = [[5, 6, 2, 8]]
    (row,) = check.evaluate(state)
    assert row["passed"] and row["agree"] == 4 and row["prefix_lens"] == [2]
