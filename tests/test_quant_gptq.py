"""GPTQ against a float64 re-implementation of the reference, and against RTN."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from quantkit.errors import NumericsError
from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.clip import clip_to_gram, group_grams
from quantkit.quantizers.gptq import GPTQParams, feedback_target, gptq_quantize
from quantkit.quantizers.hessian import HessianAccumulator
from quantkit.quantizers.rtn import quantize_rtn, weight_qparams
from quantkit.scheme import Scheme, WeightScheme

from .helpers import FakeCalibration, correlated_inputs, llama_graph, tiny_llama_layer

LLAMA = llama_graph()


def _scheme(bits=4, sym=True, group=128):
    if group == -1:
        return Scheme(WeightScheme(num_bits=bits, symmetric=sym, strategy="channel", group_size=None))
    return Scheme(WeightScheme(num_bits=bits, symmetric=sym, strategy="group", group_size=group))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T.double() @ x.double()


def _ref_params(rows: torch.Tensor, ws: WeightScheme):
    """Float64 scale/zero per row, written from the reference's Quantizer.find_params."""
    qmin, qmax = ws.qmin, ws.qmax
    if ws.symmetric:
        amax = rows.abs().amax(1, keepdim=True)
        return (amax / ((qmax - qmin) / 2)).clamp_min(1e-12), torch.zeros_like(amax)
    lo = rows.amin(1, keepdim=True).clamp_max(0)
    hi = rows.amax(1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def ref_gptq(w, h, ws, group, act_order=False, static_groups=False, damp=0.01):
    """Column-at-a-time GPTQ in float64 (no lazy blocks: mathematically the same updates)."""
    W, H = w.double().clone(), h.double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    col_s = col_z = None
    if group == -1 or static_groups:
        g = n if group == -1 else group
        pairs = [_ref_params(W[:, i : i + g], ws) for i in range(0, n, g)]
        col_s = torch.cat([p[0].expand(-1, g) for p in pairs], 1)
        col_z = torch.cat([p[1].expand(-1, g) for p in pairs], 1)
    perm = torch.arange(n)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if col_s is not None:
            col_s, col_z = col_s[:, perm], col_z[:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros_like(W)
    for j in range(n):
        if col_s is None:
            if j % group == 0:
                s, z = _ref_params(W[:, j : j + group], ws)
        else:
            s, z = col_s[:, j : j + 1], col_z[:, j : j + 1]
        q = torch.clamp(torch.round(W[:, j : j + 1] / s) + z, ws.qmin, ws.qmax)
        codes[:, j] = q[:, 0]
        err = (W[:, j] - ((q - z) * s)[:, 0]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return codes[:, torch.argsort(perm)]


def _out_err(w, w_hat, x):
    return torch.linalg.norm(x.double() @ (w.double() - w_hat.double()).T).item()


CASES = [
    dict(bits=4, sym=True, group=16, act_order=False, static_groups=False),
    dict(bits=4, sym=False, group=16, act_order=True, static_groups=False),
    dict(bits=4, sym=True, group=16, act_order=True, static_groups=True),
    dict(bits=8, sym=False, group=-1, act_order=True, static_groups=False),
    dict(bits=4, sym=True, group=-1, act_order=False, static_groups=False),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = correlated_inputs(256, 64, g)
    h = _hessian(x)
    ws = _scheme(case["bits"], case["sym"], case["group"]).weights
    # block_size 32 with group 16: the lazy block updates are exercised across blocks.
    qw = gptq_quantize(
        w, h.float(), Scheme(ws), block_size=32, act_order=case["act_order"], static_groups=case["static_groups"]
    )
    ref = ref_gptq(w, h, ws, case["group"], case["act_order"], case["static_groups"])
    same = (qw.codes.double() == ref).double().mean().item()
    # float32 vs float64 may flip a code sitting on a rounding boundary (and its error then
    # propagates); anything beyond a handful means a different algorithm.
    assert same >= 0.97, same
    ref_qw = qw.__class__(ref.to(torch.int8), qw.scale, qw.zero_point, qw.scheme, qw.g_idx)
    assert _out_err(w, qw.dequantize(), x) <= 1.05 * _out_err(w, ref_qw.dequantize(), x)


RTN_CASES = [
    dict(bits=4, sym=True, group=128),
    dict(bits=4, sym=False, group=64),
    dict(bits=4, sym=True, group=32, act_order=True),
    dict(bits=4, sym=False, group=32, act_order=True, static_groups=True),
    dict(bits=8, sym=True, group=-1),
    dict(bits=4, sym=True, group=-1, act_order=True),
]


@pytest.mark.parametrize("case", RTN_CASES)
def test_beats_rtn_on_correlated_inputs(case):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    x = correlated_inputs(1024, 256, g)
    scheme = _scheme(case["bits"], case["sym"], case["group"])
    qw = gptq_quantize(
        w, _hessian(x).float(), scheme,
        act_order=case.get("act_order", False), static_groups=case.get("static_groups", False),
    )
    rtn = quantize_rtn(w, scheme)
    assert qw.codes.dtype == torch.int8
    assert int(qw.codes.min()) >= scheme.weights.qmin and int(qw.codes.max()) <= scheme.weights.qmax
    assert _out_err(w, qw.dequantize(), x) < 0.9 * _out_err(w, rtn.dequantize(), x)


def test_act_order_g_idx_and_static_groups():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    x = correlated_inputs(512, 128, g) * torch.linspace(0.1, 3, 128)
    scheme = _scheme(4, False, 32)
    dyn = gptq_quantize(w, _hessian(x).float(), scheme, act_order=True)
    assert dyn.g_idx is not None and dyn.g_idx.dtype == torch.int32
    assert torch.bincount(dyn.g_idx.long()).tolist() == [32] * 4
    assert not torch.equal(dyn.g_idx.long(), torch.arange(128) // 32)
    assert dyn.scheme.weights.actorder == "group"
    static = gptq_quantize(w, _hessian(x).float(), scheme, act_order=True, static_groups=True)
    assert static.g_idx is None and static.scheme.weights.actorder == "static"
    scale, zero = weight_qparams(w, scheme.weights)
    assert torch.equal(static.scale, scale) and torch.equal(static.zero_point, zero)


def test_singular_hessian_is_finite_and_dead_columns_zero(caplog):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(8, 64, generator=g)  # rank 8 < 64
    x[:, :5] = 0  # dead columns
    qw = gptq_quantize(w, _hessian(x).float(), _scheme(4, True, 32))
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert (deq[:, :5] == 0).all()
    # Not positive definite even after 1% damping: retried with more, and logged.
    h = torch.eye(64)
    h[0, 1] = h[1, 0] = 1.04
    with caplog.at_level(logging.WARNING, logger="quantkit.quantizers.gptq"):
        qw = gptq_quantize(w, h, _scheme(4, True, 32), name="probe")
    assert torch.isfinite(qw.dequantize()).all()
    assert any("probe" in r.message and "dampening" in r.message for r in caplog.records)


def test_unrescuable_hessian_raises():
    w = torch.randn(8, 32)
    with pytest.raises(NumericsError) as e:
        gptq_quantize(w, -torch.eye(32), _scheme(4, True, 32), name="probe")
    assert e.value.file == "probe" and e.value.hint == (
        "check the calibration activations for NaN/Inf or use more calibration samples")
    with pytest.raises(NumericsError) as e:
        gptq_quantize(w, torch.full((32, 32), float("nan")), _scheme(4, True, 32), name="probe")
    assert e.value.file == "probe" and e.value.hint == "the calibration activations are not finite"


def test_hessian_accumulator_matches_float64():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 24, generator=g) for n in (7, 30, 1)]
    acc = HessianAccumulator()
    for x in xs:
        acc.add(x)
    ref = _hessian(torch.cat(xs))
    torch.testing.assert_close(acc.hessian().double(), ref, rtol=1e-5, atol=1e-6)


def test_quantizer_accumulates_each_shared_hessian_once(monkeypatch):
    layer, data, cfg = tiny_llama_layer(seed=6, batches=3)
    calls = {"n": 0}
    orig = HessianAccumulator.add

    def counting(self, x):
        calls["n"] += 1
        orig(self, x)

    monkeypatch.setattr(HessianAccumulator, "add", counting)
    params = GPTQParams(group_size=32, act_order=True)
    quantizer = QUANTIZERS["gptq"](params, cfg)
    calib = FakeCalibration(layer, data)
    out = quantizer.quantize_layer(layer, LLAMA, calib)
    assert set(out) == set(LLAMA.linears)
    assert calib.runs == 1
    # One hook per input group (q/k/v share one; gate/up share one), one call per batch.
    assert set(calib.hook_calls) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    assert calls["n"] == 4 * 3
    for name, qw in out.items():
        assert qw.shape == tuple(layer.get_submodule(name).weight.shape)
        assert torch.isfinite(qw.dequantize()).all()


def test_params_validation():
    with pytest.raises(Exception):
        GPTQParams(bits=3)
    with pytest.raises(Exception):
        GPTQParams(group_size=100)
    with pytest.raises(Exception):
        GPTQParams(unknown=1)
    s = GPTQParams(group_size=-1).scheme()
    assert s.weights.strategy == "channel" and s.weights.group_size is None


def test_group_grams_are_the_hessian_diagonal_blocks():
    h = torch.randn(48, 48, dtype=torch.float64)
    blocks = group_grams(h, 16)
    assert blocks.shape == (3, 16, 16)
    for i in range(3):
        assert torch.equal(blocks[i], h[16 * i:16 * (i + 1), 16 * i:16 * (i + 1)])


@pytest.mark.parametrize("sym", [True, False])
def test_clip_to_gram_picks_each_groups_best_shrink(sym):
    """Against a float64 brute force over the same shrink grid: every (row, group) gets the
    range whose RTN error under its Gram block is smallest, so never worse than min-max."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 64, generator=g)
    w[:, 5] *= 6  # an outlier column: shrinking its groups' range pays off
    x = correlated_inputs(512, 64, g)
    scheme = _scheme(4, sym, 16)
    grams = group_grams(_hessian(x).float(), 16)
    got = clip_to_gram(w, grams, scheme, grid=10)
    ref_scale, _ = weight_qparams(got, scheme.weights)
    for r in range(8):
        for k in range(4):
            cols = slice(16 * k, 16 * (k + 1))
            gk = grams[k].double()

            def loss(wc):
                d = (w[r:r + 1, cols] - quantize_rtn(wc, _scheme(4, sym, 16)).dequantize()).double()[0]
                return float(d @ gk @ d)

            wr = w[r:r + 1, cols]
            lo, hi = (-wr.abs().max(), wr.abs().max()) if sym else (wr.min().clamp_max(0), wr.max().clamp_min(0))
            best = min(loss(wr.clamp(lo * (1 - i / 10), hi * (1 - i / 10))) for i in range(5))
            assert loss(got[r:r + 1, cols]) <= best * (1 + 1e-5) + 1e-9
    assert (ref_scale < weight_qparams(w, scheme.weights)[0]).any()  # some range did shrink


@pytest.mark.parametrize("preset", ["W4A16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC", "NVFP4A16", "MXFP4A16"])
def test_a_shrinks_error_is_the_rounded_clamped_weights(preset):
    """The clip search's error of a shrink, computed in the groups' shape from their range,
    is ``w − quantize_rtn(clamped w).dequantize()`` to the bit, for every grid and layout it
    serves (a global scale taken from the whole clamped weight)."""
    from quantkit.presets import PRESETS
    from quantkit.quantizers.clip import _clamp_groups, _rtn_error
    from quantkit.quantizers.rtn import weight_global_scale

    scheme = PRESETS[preset]
    g = torch.Generator().manual_seed(8)
    w = torch.randn(24, 128, generator=g) * 0.05
    w[:, 9] *= 7
    size = scheme.weights.group_size or 128
    wg = w.reshape(24, -1, size)
    hi0, lo0 = (wg.abs().amax(-1), -wg.abs().amax(-1)) if scheme.weights.symmetric else \
        (wg.amax(-1).clamp_min(0), wg.amin(-1).clamp_max(0))
    for r in (1.0, 0.85, 0.55):
        want = w - quantize_rtn(_clamp_groups(wg, lo0 * r, hi0 * r).reshape(w.shape), scheme).dequantize()
        gs = weight_global_scale([torch.maximum(hi0 * r, -(lo0 * r))], scheme.weights)
        got = _rtn_error(wg, lo0 * r, hi0 * r, scheme, gs).reshape(w.shape)
        assert torch.equal(got, want), r


def test_gptq_clip_search_lowers_the_output_error_with_outliers():
    g = torch.Generator().manual_seed(5)
    errs = {True: 0.0, False: 0.0}
    for _ in range(3):
        w = torch.randn(64, 256, generator=g)
        w[:, torch.randint(0, 256, (8,), generator=g)] *= 8
        x = correlated_inputs(1024, 256, g)
        for clip in errs:
            qw = gptq_quantize(w, _hessian(x).float(), _scheme(4, True, 32), act_order=True, static_groups=True,
                               clip_search=clip)
            errs[clip] += _out_err(w, qw.dequantize(), x)
    assert errs[True] < errs[False], errs


def test_clip_search_needs_fixed_group_scales():
    with pytest.raises(Exception, match="static_groups"):
        GPTQParams(clip_search=True, group_size=64, static_groups=False)
    assert GPTQParams(clip_search=True, group_size=64).clip_search
    assert GPTQParams(clip_search=True, group_size=-1, static_groups=False).clip_search


def test_defaults_are_act_order_with_static_groups():
    p = GPTQParams()
    assert p.act_order and p.static_groups and p.scheme().weights.actorder == "static"


def _noisy_pair(g: torch.Generator, n: int = 2048, d: int = 64, noise: float = 0.3):
    x = correlated_inputs(n, d, g)
    return x, x + noise * x.std() * torch.randn(n, d, generator=g)


def _gptaq_reference(w, x, xq, damp_frac: float, alpha: float, order: torch.Tensor) -> torch.Tensor:
    """GPTAQ's column loop without rounding, in float64, from its definition: visiting columns
    in ``order``, column ``i``'s input mismatch ``X[:, i] − X̃[:, i]`` is ridge-regressed on the
    columns still to visit (ridge λ = GPTQ's damping on ``2/n X̃ᵀX̃``), and ``α`` times the
    coefficients, scaled by column ``i``'s current weight, are added to those columns."""
    x, xq, w = x.double()[:, order], xq.double()[:, order], w.double()[:, order].clone()
    n, d = xq.shape
    h = 2.0 / n * xq.T @ xq
    lam = damp_frac * torch.diagonal(h).mean() * n / 2
    for i in range(d - 1):
        later = xq[:, i + 1:]
        gram = later.T @ later + lam * torch.eye(d - i - 1, dtype=torch.float64)
        coef = torch.linalg.solve(gram, later.T @ (x[:, i] - xq[:, i]))
        w[:, i + 1:] += alpha * w[:, i:i + 1] * coef
    return w[:, torch.argsort(order)]


@pytest.mark.parametrize("act_order", [False, True])
def test_feedback_target_is_gptaqs_loop_without_rounding(act_order):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(16, 48, generator=g)
    x, xq = _noisy_pair(g, n=512, d=48)
    xq = xq * torch.linspace(0.5, 2.0, 48, dtype=torch.float64).to(xq.dtype)  # act-order's visiting order matters
    h, cross = _hessian(xq), 2.0 / xq.shape[0] * xq.T.double() @ x.double()
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(48)
    h, cross = h.float(), cross.float()  # as accumulated: the float32 arithmetic the quantizer runs
    for alpha in (0.25, 1.0):
        got = feedback_target(w, h, cross, 0.01, alpha=alpha, act_order=act_order)
        want = _gptaq_reference(w, x, xq, 0.01, alpha, order)
        # float32 with bf16-split products: about 2e-5 of the correction (0.7 and 2.7 at most here)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


_TARGET_PEAK = """
import sys, torch
from quantkit.quantizers.gptq import feedback_target
torch.set_num_threads(1)
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(2 * n, n, generator=g)
h, cross, w = x.T @ x, x.T @ (x + 0.1 * torch.randn(2 * n, n, generator=g)), torch.randn(64, n, generator=g)
del x
def vm(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
feedback_target(w, h, cross, 0.01, act_order=True)  # LAPACK's buffers allocated once
base = vm("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
feedback_target(w, h, cross, 0.01, act_order=True)
print(vm("VmHWM:") - base)
"""


def test_feedback_target_peak_is_what_the_plan_counts():
    """The float32 ``[in, in]`` matrices ``feedback_target`` holds at once (measured as the
    peak RSS growth of a fresh process, in=1024: 4 MiB each) are the
    ``FEEDBACK_TARGET_MATRICES`` that ``quantkit plan`` counts for GPTAQ's solve."""
    import os
    import subprocess
    import sys

    from quantkit.quantizers.gptq import FEEDBACK_TARGET_MATRICES

    n = 1024
    # Every large block mmapped and unmapped when freed: glibc's adaptive threshold would keep
    # freed blocks in the heap, and the peak would depend on what ran before.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _TARGET_PEAK, str(n)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) / (4 * n * n) == pytest.approx(FEEDBACK_TARGET_MATRICES, abs=0.5)


def test_feedback_target_is_the_weight_when_the_streams_are_equal():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(16, 64, generator=g)
    x = correlated_inputs(256, 64, g)
    h = 2.0 / x.shape[0] * x.T @ x  # float32, as accumulated: not exactly symmetric
    assert torch.equal(feedback_target(w, h, h.clone(), 0.01, alpha=1.0, act_order=True), w)


def test_gptq_on_the_feedback_target_fits_the_float_output_better_on_held_out_tokens():
    """Upstream error as a linear distortion of the inputs (``X̃ = X A``): on fresh tokens, GPTQ
    on the feedback target (GPTAQ's α = 0.25) is closer to the float output than plain GPTQ."""
    g = torch.Generator().manual_seed(7)
    plain = fb = 0.0
    for _ in range(3):
        w = torch.randn(32, 64, generator=g)
        distort = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g) / 8
        x, held = correlated_inputs(4096, 64, g), correlated_inputs(4096, 64, g)
        xq = x @ distort
        h = _hessian(xq).float()
        cross = (2.0 / xq.shape[0] * xq.T.double() @ x.double()).float()
        want = held.double() @ w.double().T
        for target, acc in ((w, "plain"), (feedback_target(w, h, cross, 0.01, act_order=True), "fb")):
            qw = gptq_quantize(target, h, _scheme(4, True, 16), act_order=True, static_groups=True)
            err = torch.linalg.norm(want - (held @ distort).double() @ qw.dequantize().double().T).item()
            plain, fb = (plain + err, fb) if acc == "plain" else (plain, fb + err)
    assert fb < 0.97 * plain, (fb, plain)


def _paired_run(model, text_file, out, monkeypatch, quantize: bool, runs=(True,), sequential: bool = False):
    """GPTQ runs of ``model`` with input feedback on or off (``runs``); returns the calibration
    batches and, per (layer, Linear, batch), the Linear's input on the quantized and on the
    float stream (the last run's), and every Linear's quantized weight per run. With
    ``quantize`` False the layers keep their float weights after being quantized (the engine's
    apply_record does nothing), so both streams must be the same."""
    from quantkit import engine
    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    batches, seen, quantized = [], {}, {}
    make_batches, observe_paired = engine.make_batches, engine._LayerCalibration.observe_paired

    def recorded_batches(seqs, size):
        got = make_batches(seqs, size)
        batches.extend(got)
        return got

    def recorded_observe(self, stats, **kw):
        def spy(name, stat):
            count = iter(range(len(self.batches)))

            def add(xq, xf):
                seen[(self.index, name, next(count))] = (xq.clone(), xf.clone())
                stat.add(xq, xf)
            return SimpleNamespace(add=add, reduce=stat.reduce)
        observe_paired(self, {n: spy(n, s) for n, s in stats.items()}, **kw)

    monkeypatch.setattr(engine, "make_batches", recorded_batches)
    monkeypatch.setattr(engine._LayerCalibration, "observe_paired", recorded_observe)
    if not quantize:
        monkeypatch.setattr(engine, "apply_record", lambda *_: None)
    for fb in runs:
        got = quantized[fb] = {}
        batches.clear()
        run(make_recipe({
            "model": {"id": str(model)},
            "quantization": {"method": "gptq", "bits": 4, "group_size": 32, "input_feedback": fb,
                             "sequential": sequential},
            "calibration": {"source": str(text_file), "num_samples": 4, "max_seq_length": 16, "batch_size": 2},
            "evaluate": {"enabled": False}, "export": {"output_dir": str(out / f"{quantize}-{fb}")},
            "device": "cpu"}),
            quiet=True, on_layer=lambda i, _layer, q, got=got: got.update({(i, n): w for n, w in q.items()}))
    return batches[:2], seen, quantized


def test_input_feedback_streams_are_equal_when_nothing_is_quantized(text_file, tmp_path, monkeypatch):
    """Layers left float after quantizing: the two streams are the same tensors at every layer
    and batch, so the feedback target is the weight itself and the codes are plain GPTQ's
    at every layer (not only the first)."""
    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=3, hidden=64, intermediate=128)
    _, seen, quantized = _paired_run(model, text_file, tmp_path, monkeypatch, quantize=False, runs=(False, True))
    assert {i for i, n, _ in seen if n == "self_attn.q_proj"} == {0, 1, 2}
    for key, (xq, xf) in seen.items():
        assert torch.equal(xq, xf), key
    assert quantized[True].keys() == quantized[False].keys()
    for key, w in quantized[False].items():
        assert torch.equal(quantized[True][key].codes, w.codes), key


def _inputs_in(reference, batches, names) -> dict:
    """Per (layer, Linear, batch) the Linear's input in the transformers model ``reference``."""
    want = {}
    for b, ids in enumerate(batches):
        hooks = [layer.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, i=i, n=n: want.__setitem__((i, n, b), a[0].reshape(-1, a[0].shape[-1])))
            for i, layer in enumerate(reference.model.layers) for n in names]
        with torch.no_grad():
            reference(ids)
        for h in hooks:
            h.remove()
    return want


def _float_model(model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


@pytest.mark.parametrize("sequential", [False, True])
def test_input_feedback_float_stream_is_the_float_model(sequential, text_file, tmp_path, monkeypatch):
    """Quantized for real: at every layer, Linear and batch the float stream's input is what
    the plain float model computes on that batch (same tokens, positions, layer; with
    ``sequential`` also after each group's quantized weights were put in for the quantized
    stream), and from layer 1 the quantized stream differs from it."""
    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=3, hidden=64, intermediate=128)
    batches, seen, _ = _paired_run(model, text_file, tmp_path, monkeypatch, quantize=True, sequential=sequential)
    want = _inputs_in(_float_model(model), batches, ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"))
    assert want.keys() <= seen.keys()
    for key, (xq, xf) in seen.items():
        if key not in want:
            continue
        torch.testing.assert_close(xf, want[key], rtol=1e-5, atol=1e-6, msg=str(key))
        if key[0] > 0:
            assert (xq - xf).abs().max() > 1e-3, key


def test_sequential_groups_are_calibrated_on_the_layer_quantized_before_them(text_file, tmp_path, monkeypatch):
    """With ``sequential``, each input group's quantized-stream input in the first layer (whose
    own input is the float one) is the float layer's with the groups its forward reaches
    first replaced by their quantized weights: o_proj after q/k/v, gate/up after o_proj,
    down_proj after gate/up. Input feedback then compensates the layer's own earlier groups:
    q/k/v (both streams equal there) keep plain GPTQ's codes, the later groups do not."""
    from .tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", layers=2, hidden=64, intermediate=128)
    batches, seen, quantized = _paired_run(model, text_file, tmp_path, monkeypatch, quantize=True, runs=(False, True),
                                           sequential=True)
    reference = _float_model(model)
    order = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
             ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    done: list[str] = []
    for group in order:
        want = _inputs_in(reference, batches, group[:1])
        for b in range(len(batches)):
            xq, xf = seen[(0, group[0], b)]
            torch.testing.assert_close(xq, want[(0, group[0], b)], rtol=1e-5, atol=1e-5, msg=f"{group[0]} {b}")
            if done:
                assert (xq - xf).abs().max() > 1e-4, (group, b)
        for n in group:
            with torch.no_grad():
                reference.model.layers[0].get_submodule(n).weight.copy_(
                    quantized[True][(0, n)].dequantize(torch.float32))
        done += group
    for n in order[0]:
        assert torch.equal(quantized[True][(0, n)].codes, quantized[False][(0, n)].codes), n
    assert any(not torch.equal(quantized[True][(0, n)].codes, quantized[False][(0, n)].codes) for n in done[3:])


class _SameStreams(FakeCalibration):
    """Paired calibration whose float stream is the quantized one (as in a model's first layer)."""

    def observe_paired(self, stats, later=()) -> None:
        self.run({k: (lambda x, s=s: s.add(x, x)) for k, s in stats.items()})
        for s in stats.values():
            s.reduce(self.world)


@pytest.mark.parametrize("feedback", [False, True])
def test_plan_counts_the_statistics_a_quantized_layer_holds(feedback, monkeypatch):
    """A real decoder layer quantized with and without input_feedback: the float32 statistics
    its accumulators hold after calibration (all alive until the layer's solves end) are what
    ``quantkit plan`` counts for a layer of that shape."""
    from quantkit.planner import ModelShape
    from quantkit.planner.quantize import Calibrating, quantize_memory

    held: dict[int, int] = {}
    reduce = HessianAccumulator.reduce

    def measured(self, world) -> None:
        reduce(self, world)
        held[id(self)] = self.hessian().numel() * self.hessian().element_size()

    monkeypatch.setattr(HessianAccumulator, "reduce", measured)
    layer, data, cfg = tiny_llama_layer(seed=1)
    quantizer = QUANTIZERS["gptq"](GPTQParams(group_size=32, input_feedback=feedback), cfg)
    quantizer.quantize_layer(layer, llama_graph(), _SameStreams(layer, data))
    planned = quantize_memory(ModelShape.from_config(cfg), Calibrating.of(quantizer, 2, 16, "test"))
    assert sum(held.values()) == planned.hessians


def test_input_feedback_computes_one_operator_and_one_factor_per_input_group(monkeypatch):
    """q/k/v (gate/up) read one input: their feedback targets come from one operator, not
    one per Linear (the operator's cost is the [in, in] work, a 14336-wide down_proj's 0.3 s
    on an H200 in float64), and GPTQ's solve takes the operator's factor of the damped
    inverse Hessian instead of factoring the same matrix again."""
    from quantkit.quantizers import gptq

    made: list[str] = []
    factored: list[int] = []
    operator, factor = gptq.feedback_operator, gptq.upper_inverse_factor

    def counted(*args, **kw):
        made.append(kw["name"])
        return operator(*args, **kw)

    def counted_factor(h):
        factored.append(h.shape[-1])
        return factor(h)

    monkeypatch.setattr(gptq, "feedback_operator", counted)
    monkeypatch.setattr(gptq, "upper_inverse_factor", counted_factor)
    layer, data, cfg = tiny_llama_layer(seed=2)
    graph = llama_graph()
    QUANTIZERS["gptq"](GPTQParams(group_size=32, input_feedback=True), cfg).quantize_layer(
        layer, graph, _SameStreams(layer, data))
    assert sorted(made) == sorted("+".join(g.linears) for g in graph.groups)
    assert len(factored) == len(graph.groups)


def test_a_given_inverse_factor_is_the_one_gptq_computes():
    """The feedback operator's factor of the damped inverse Hessian, in act-order, solves to
    the same codes as GPTQ's own factorisation."""
    from quantkit.quantizers.gptq import feedback_operator, gptq_quantize_batch

    g = torch.Generator().manual_seed(6)
    w = torch.randn(48, 128, generator=g)
    h = _hessian(correlated_inputs(512, 128, g)).float()
    h[:, 7] = h[7, :] = 0  # a dead column, patched alike by both
    scheme = _scheme(4, False, 32)
    op = feedback_operator(h, h, 0.01, act_order=True)
    opts = dict(act_order=True, static_groups=True, dampening_frac=0.01)
    given = gptq_quantize_batch(w[None], h[None], scheme, inverse_factor=op.upper[None], **opts)[0]
    own = gptq_quantize_batch(w[None], h[None], scheme, **opts)[0]
    assert torch.equal(given.codes, own.codes) and torch.equal(given.scale, own.scale)


def test_the_feedback_operator_retries_damping_as_gptq_does(caplog):
    """A quantized-input Hessian that 1% damping leaves indefinite gets GPTQ's retries with
    more damping (logged), not an error: GPTQ's solve takes the operator's factor, so both
    must damp alike, and plain GPTQ quantizes this Hessian."""
    from quantkit.quantizers.gptq import _inverse_hessian_factor, feedback_operator

    h = torch.eye(64)
    h[0, 1] = h[1, 0] = 1.04
    with caplog.at_level(logging.WARNING, logger="quantkit.quantizers.gptq"):
        op = feedback_operator(h, h, 0.01, name="probe")
    assert any("probe" in r.message and "dampening" in r.message for r in caplog.records)
    assert torch.equal(op.upper, _inverse_hessian_factor(h.clone()[None], 0.01, ["probe"])[0])


def test_split_product_against_float64():
    """The bf16-split product keeps about 16 bits: within 3e-5 of float64 on unevenly scaled
    rows, where one bf16 product is off by 2e-3."""
    from quantkit.quantizers.split_product import split_product

    g = torch.Generator().manual_seed(4)
    a = torch.randn(300, 200, generator=g) * torch.exp(torch.randn(200, generator=g))
    b = torch.randn(200, 120, generator=g)
    want = a.double() @ b.double()

    def error(got: torch.Tensor) -> float:
        return ((got.double() - want).norm() / want.norm()).item()

    assert error(split_product(a, b)) < 3e-5
    assert error(a.bfloat16().float() @ b.bfloat16().float()) > 1e-3


@pytest.mark.parametrize("dtype, device", [(torch.float32, "cpu"), (torch.float64, "cpu"),
                                           pytest.param(torch.float32, "cuda", marks=pytest.mark.gpu)])
def test_upper_blocks_product_is_the_products_upper_blocks(dtype, device, monkeypatch):
    """GPTAQ's products of triangular factors, blocks on and above the diagonal only, each
    against the factors' nonzero blocks: the full product's blocks (float32 within the
    split's 3e-5, float64 to rounding), zero below; blocks straddling the matrix's edge. On a
    GPU the blocks are ``CUDA_BLOCK`` wide, on the CPU ``BLOCK``: only the device's own is
    narrowed, so the other would leave the whole product and fail."""
    from quantkit.quantizers import split_product

    monkeypatch.setattr(split_product, "CUDA_BLOCK" if device == "cuda" else "BLOCK", 64)
    g = torch.Generator().manual_seed(9)
    n = 150
    dense = torch.randn(n, n, generator=g, dtype=torch.float64)
    upper = torch.randn(n, n, generator=g, dtype=torch.float64).triu()
    strict = torch.randn(n, n, generator=g, dtype=torch.float64).triu(1)
    block = torch.arange(n) // 64
    above = block.unsqueeze(1) <= block.unsqueeze(0)
    for a, b, kw in ((dense, upper.T, dict(b_lower=True)), (strict, upper, dict(a_upper=True, b_upper=True))):
        got = split_product.upper_blocks_product(a.to(device, dtype), b.to(device, dtype), **kw).cpu().double()
        want = torch.where(above, a @ b, torch.zeros(()))
        assert ((got - want).norm() / want.norm()).item() < (3e-5 if dtype == torch.float32 else 1e-14)
        assert torch.equal(got[~above], torch.zeros_like(got[~above]))


def test_input_feedback_keeps_per_linear_schemes_and_input_global_scales():
    """input_feedback on an assignment (NVFP4 W4A4 on q/k/v only): with equal streams its
    target is the weight itself, so it quantizes exactly the assigned Linears as plain GPTQ
    does, global scales and the input global scale (watched on the quantized stream) included."""
    from quantkit.presets import preset_scheme

    layer, data, cfg = tiny_llama_layer(seed=3)
    schemes = {n: preset_scheme("NVFP4") for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    outs = {}
    for fb in (False, True):
        q = QUANTIZERS["gptq"](GPTQParams.model_validate({"input_feedback": fb}), cfg)
        outs[fb] = q.quantize_layer(layer, llama_graph(), _SameStreams(layer, data), schemes)
    assert set(outs[True]) == set(schemes)
    for n in schemes:
        plain, fb = outs[False][n], outs[True][n]
        assert torch.equal(fb.codes, plain.codes), n
        assert torch.equal(fb.global_scale, plain.global_scale), n
        assert fb.input_global_scale is not None and torch.equal(fb.input_global_scale, plain.input_global_scale), n


def test_upper_inverse_factor_against_float64():
    """One factorisation and one triangular solve give the reference's factor of ``H⁻¹``
    (float64 inverse, then its Cholesky), per element of a stack; a Hessian that is not
    positive definite is reported in ``info``, not returned as if it were."""
    from quantkit.quantizers.gptq import upper_inverse_factor

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 400, 96, generator=g) * torch.linspace(0.1, 4.0, 96)
    h = x.transpose(1, 2) @ x / 400 + 1e-3 * torch.eye(96)
    upper, info = upper_inverse_factor(h)
    ref = torch.linalg.cholesky(torch.linalg.inv(h.double()), upper=True)
    assert info.tolist() == [0, 0, 0]
    assert torch.equal(upper, upper.triu())
    assert (upper - ref).abs().max() / ref.abs().max() < 1e-5
    bad = h.clone()
    bad[1, 5, 5] = -1.0
    assert upper_inverse_factor(bad)[1].tolist()[1] != 0


@pytest.mark.parametrize("n", [64, 300])
def test_lower_inverse_by_halves_against_float64(n):
    """Split down to 32-wide solves, the inverse of a Cholesky factor matches float64's and the
    one solve against the identity does (per element of a stack, upper triangle exactly zero)."""
    from quantkit.quantizers.gptq import lower_inverse_into

    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 4 * n, n, generator=g) * torch.linspace(0.1, 4.0, n)
    low = torch.linalg.cholesky(x.transpose(1, 2) @ x / (4 * n) + 1e-2 * torch.eye(n))
    out = torch.empty_like(low)
    lower_inverse_into(low, out, base=32)
    ref = torch.linalg.solve_triangular(low.double(), torch.eye(n, dtype=torch.float64).expand_as(low), upper=False)
    solved = torch.linalg.solve_triangular(low, torch.eye(n).expand_as(low), upper=False)
    assert torch.equal(out, out.tril())
    err, solve_err = ((t.double() - ref).abs().max() / ref.abs().max() for t in (out, solved))
    assert err < max(4 * solve_err, 1e-6)
