"""The engine keeps one decoder layer in memory, however many layers the model has."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.tiny_models import make_tiny_model

HIDDEN, INTER = 512, 2048
LAYER_BYTES = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) * 4  # q,k,v,o (no GQA) + gate,up,down, fp32

# Runs in a fresh process: imports first, then resets the kernel's peak-RSS mark (VmHWM) so the
# peak measured is the run's own; also reports ModelSource's count of source bytes alive at once.
_PROBE = textwrap.dedent("""
    import json, sys
    import quantkit
    from quantkit import pipeline
    from quantkit.model import ModelSource
    from quantkit.recipe import make_recipe

    sources = []
    real_open = ModelSource.open.__func__
    ModelSource.open = classmethod(lambda cls, *a, **k: sources.append(real_open(cls, *a, **k)) or sources[-1])

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    recipe = make_recipe(json.loads(sys.argv[1]))
    base = vm("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    pipeline.run(recipe, quiet=True)
    print(json.dumps({"rss_growth": vm("VmHWM:") - base, "materialized": sources[0].materialized.peak}))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file):
    root = tmp_path_factory.mktemp("depth")
    out = {}
    for n in (2, 8):
        model = make_tiny_model(root / f"l{n}", layers=n, hidden=HIDDEN, intermediate=INTER, heads=4, kv_heads=4,
                                max_shard_size="20MB")
        recipe = {"model": {"id": str(model)}, "quantization": {"method": "rtn", "group_size": 128},
                  "evaluate": {"source": str(text_file), "num_samples": 2, "max_seq_length": 32},
                  "export": {"output_dir": str(root / f"out{n}"), "max_shard_size": "8MB"}}
        proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(recipe)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_materialized_weights_peak_does_not_grow_with_depth(runs):
    """Source bytes alive at once: exactly the same for 8 layers as for 2."""
    assert runs[8]["materialized"] == runs[2]["materialized"]
    assert runs[2]["materialized"] < 1.5 * LAYER_BYTES  # one layer (+ small embedding), not the model


def test_peak_rss_does_not_grow_with_depth(runs):
    """The six extra layers are ~100 MB of weights; a streaming run's peak must not carry them."""
    growth = runs[8]["rss_growth"] - runs[2]["rss_growth"]
    assert growth < 2 * LAYER_BYTES, (runs, LAYER_BYTES)
