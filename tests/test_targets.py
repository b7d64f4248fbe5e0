"""Module-name patterns and scheme assignment (targets, ignore, per-pattern overrides)."""

from __future__ import annotations

import pytest

from quantkit.presets import PRESETS
from quantkit.targets import Override, SchemeAssignment, fused_mismatches, matches, pattern_error

NAMES = [f"model.layers.{i}.{m}" for i in range(12) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
PATTERNS = ["Linear", "re:.*down_proj$", "re:.*\\.1\\.mlp\\..*", "re:model\\.layers\\.1[01]\\.", "re:mlp",
            "re:.*(q|k|v)_proj", "model.layers.3.mlp.down_proj", "model.layers.3.mlp", "down_proj", "re:.*proj"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_name_patterns_match_as_compressed_tensors_matches_them(pattern):
    """Full-name patterns mean what compressed-tensors (and so the checkpoint's loaders) make
    of them: exact names, and ``re:`` regexes matched from the start of the name."""
    from compressed_tensors.utils.match import match_name

    for name in NAMES:
        want = True if pattern == "Linear" else match_name(name, pattern)
        assert matches(name, pattern) == want, (name, pattern)


def test_pattern_errors():
    assert pattern_error("re:(") is not None and pattern_error("") is not None
    assert pattern_error("re:.*proj") is None and pattern_error("model.layers.0.mlp.up_proj") is None


def test_assignment_ignore_targets_and_later_overrides_win():
    w4, w8, fp8 = PRESETS["W4A16"], PRESETS["W8A16"], PRESETS["FP8_DYNAMIC"]
    a = SchemeAssignment(
        w4, targets=("re:.*mlp\\.", "re:.*self_attn\\.o_proj$"), ignore=("re:model\\.layers\\.0\\.",),
        overrides=(Override(("re:.*_proj$",), w8), Override(("re:.*down_proj$",), fp8)))
    got = a.resolve(NAMES)
    assert not any(n.startswith("model.layers.0.") or "q_proj" in n for n in got)
    assert got["model.layers.5.mlp.down_proj"] == fp8 and got["model.layers.5.mlp.up_proj"] == w8
    assert got["model.layers.5.self_attn.o_proj"] == w8
    assert a.schemes == (w4, w8, fp8) and not a.uniform
    assert SchemeAssignment(w4).uniform and SchemeAssignment(w4).resolve(NAMES) == {n: w4 for n in NAMES}
    assert a.unmatched(NAMES) == [] and SchemeAssignment(w4, ignore=("lm_head",)).unmatched(NAMES) == ["lm_head"]


def test_fused_sets_must_share_a_scheme():
    w4, w8 = PRESETS["W4A16"], PRESETS["W8A16"]
    qkv = ["l.q_proj", "l.k_proj", "l.v_proj"]
    assert fused_mismatches({"l.q_proj": w4, "l.k_proj": w4, "l.v_proj": w4}, [qkv]) == []
    assert fused_mismatches({"l.q_proj": w4, "l.k_proj": w8, "l.v_proj": w4}, [qkv]) == [qkv]
    assert fused_mismatches({"l.q_proj": w4, "l.k_proj": w4}, [qkv]) == [qkv]  # v_proj left in float
