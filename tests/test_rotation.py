"""The stream rotation (issue 20): Hadamard matrices, the per-head value rotation, and the
rotated model streamed layer by layer giving the base model's logits on every family whose
graph says the stream is rotatable (float32 tiny models: agreement to 1e-4 relative; a wrong
sign, a missed norm or an unrotated head moves logits by O(1)). Families whose graph says
the rotation is not exact are refused in one line before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit.errors import ModelError
from quantkit.graph.rotate import rotate_heads
from quantkit.graph.runtime import ModelRunner
from quantkit.model import ModelSource
from quantkit.rotation.hadamard import hadamard, random_hadamard
from quantkit.rotation.stream import StreamRotation
from tests.helpers import tiny_llama_layer
from tests.tiny_models import MULTIMODAL_FAMILIES, TEXT_FAMILIES, make_tiny_model

ROTATABLE = ["llama", "qwen2", "mistral", "qwen3", "phi3"]
REFUSED = {"gemma2": "post_", "gemma3": "post_", "olmo2": "post_", "cohere": "",
           "qwen2.5-vl": "image features", "gemma3-vl": ""}


def test_every_family_is_either_rotated_or_refused():
    """A new family in tests/tiny_models.py must be placed in one list (and so be tested)."""
    assert sorted(ROTATABLE + list(REFUSED)) == sorted(TEXT_FAMILIES + MULTIMODAL_FAMILIES)


@pytest.mark.parametrize("n", [4, 12, 20, 28, 36, 64, 576, 896, 960])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


def test_random_hadamard_is_orthogonal_and_seeded():
    for n in (576, 6):  # 6 has no Hadamard matrix: a random orthogonal one stands in
        q = random_hadamard(n, torch.Generator().manual_seed(1))
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    a, b = (random_hadamard(64, torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.equal(a, b) and torch.equal(a.abs(), b.abs())


def test_rotate_heads_keeps_the_layer_function():
    """Per-head rotation between v_proj and o_proj under GQA, checked in float64."""
    from tests.helpers import llama_graph

    layer, batches, _ = tiny_llama_layer(gqa=True)
    layer = layer.double()
    graph = llama_graph(gqa=True)
    group = next(g for g in graph.groups if g.producer.kind == "attention_value")
    kw = {k: tuple(t.double() for t in v) if isinstance(v, tuple) else v.double() if v.is_floating_point() else v
          for k, v in batches[0].items()}
    with torch.no_grad():
        want = layer(**kw)
        want = want[0] if isinstance(want, tuple) else want
        d = group.producer.channels.head_dim
        before = layer.self_attn.v_proj.weight.clone()
        rotate_heads(layer, group, random_hadamard(d, torch.Generator().manual_seed(0)))
        got = layer(**kw)
        got = got[0] if isinstance(got, tuple) else got
    assert not torch.allclose(layer.self_attn.v_proj.weight, before)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _logits(runner: ModelRunner, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream the model layer by layer (as the engine does); the logits and layer 0's output."""
    (inp,) = runner.capture([ids])
    hidden, first = inp.hidden, None
    with torch.no_grad():
        for i in range(runner.num_layers):
            hidden = runner.run_layer(runner.load_layer(i), hidden, inp.calls[i])
            first = hidden if first is None else first
        return runner.logits(hidden, ids), first


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("rot")
    return lambda arch, tied=False: make_tiny_model(root / f"{arch}-{tied}", arch=arch, tied=tied, layers=2,
                                                    hidden=128, intermediate=256)


@pytest.mark.parametrize("arch,tied", [(a, False) for a in ROTATABLE] + [("llama", True)])
def test_rotated_model_streams_to_the_base_logits(families, arch, tied):
    source = ModelSource.open(str(families(arch, tied)), None, False, None)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    base = ModelRunner(source, torch.device("cpu"), torch.float32)
    want, base_first = _logits(base, ids)
    rotated = ModelRunner(source, torch.device("cpu"), torch.float32)
    rotation = StreamRotation(rotated)
    rotated.edits.append(rotation)
    got, rot_first = _logits(rotated, ids)
    assert rotation.untie == tied
    # the stream really is rotated (layer 0's output is base @ Q), and the logits are the base ones
    torch.testing.assert_close(rot_first.double(), base_first.double() @ rotation.q, rtol=1e-4, atol=1e-5)
    assert (rot_first - base_first).abs().max() > 0.1 * base_first.abs().max()
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_unrotatable_families_are_refused(families, arch):
    source = ModelSource.open(str(families(arch)), None, False, None)
    runner = ModelRunner(source, torch.device("cpu"), torch.float32)
    with pytest.raises(ModelError) as e:
        StreamRotation(runner)
    assert e.value.field == "quantization.rotate"
    assert REFUSED[arch] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rotated_checkpoint_loads_with_an_untied_head(families, tmp_path, text_file):
    """Through the pipeline (RTN W8 per channel, rotated): transformers loads the output and
    its logits stay as close to the base model's as the unrotated W8 checkpoint's do."""
    import transformers

    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    model_dir = families("llama", True)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    errors = {}
    for rotate in ("none", "hadamard"):
        out = tmp_path / rotate
        run(make_recipe({
            "model": {"id": str(model_dir)},
            "quantization": {"method": "rtn", "bits": 8, "group_size": -1, "rotate": rotate},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(out)}, "device": "cpu"}), quiet=True)
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] is (rotate == "none")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False))
        with torch.no_grad():
            want, got = base(ids).logits, loaded.eval()(ids).logits
        errors[rotate] = float((got - want).abs().max() / want.abs().max())
    assert errors["hadamard"] < 0.05 and errors["hadamard"] < 3 * errors["none"], errors


def test_validation_refuses_an_unrotatable_family(families, tmp_path):
    """``quantkit validate`` (preflight.check) says it before any weight is read."""
    from quantkit import preflight
    from quantkit.recipe import make_recipe

    recipe = make_recipe({"model": {"id": str(families("gemma2"))},
                          "quantization": {"method": "rtn", "bits": 4, "group_size": 64, "rotate": "hadamard"},
                          "export": {"output_dir": str(tmp_path / "out")}, "device": "cpu"})
    with pytest.raises(ModelError) as e:
        preflight.check(recipe)
    assert e.value.field == "quantization.rotate" and "post_" in str(e.value)
    ok = make_recipe({"model": {"id": str(families("llama"))},
                      "quantization": {"method": "rtn", "bits": 4, "group_size": 64, "rotate": "hadamard"},
                      "export": {"output_dir": str(tmp_path / "out2")}, "device": "cpu"})
    assert preflight.check(ok).method == "rtn"
