"""The batched GPTQ solve (``gptq_quantize_batch``): a stack of weights, each with its own
Hessian or all with one, gives each weight what ``gptq_quantize`` gives it alone (bitwise on
CPU, where the batched kernels compute each element as the single ones do), and so the
float64 reference's codes; ``gptq_layer`` batches a MoE layer's experts without changing any
expert's result."""

from __future__ import annotations

import logging

import pytest
import torch

from quantkit.errors import NumericsError
from quantkit.presets import preset_scheme
from quantkit.quantizers.gptq import gptq_quantize, gptq_quantize_batch
from quantkit.scheme import Scheme, WeightScheme

from .helpers import correlated_inputs
from .test_quant_gptq import _hessian, _scheme, ref_gptq

CASES = {
    "int4 g16 act-order static": (_scheme(4, True, 16), dict(act_order=True, static_groups=True)),
    "int4 asym g16 act-order dynamic (g_idx)": (_scheme(4, False, 16), dict(act_order=True)),
    "int8 asym channel act-order": (_scheme(8, False, -1), dict(act_order=True)),
    "int4 g16 clip search": (_scheme(4, True, 16), dict(static_groups=True, clip_search=True)),
    "NVFP4 (global scale per weight)": (preset_scheme("NVFP4A16"), {}),
    "FP8 block 16 (row blocks in the loop)": (preset_scheme("FP8_BLOCK_A16", block_size=16), {}),
    "FP8 per tensor": (Scheme(WeightScheme(num_bits=8, type="float", strategy="tensor", group_size=None)), {}),
}


def _inputs(n_w: int, shared: bool, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_w, 32, 64, generator=g) * torch.linspace(0.5, 2.0, n_w).view(-1, 1, 1)
    xs = [correlated_inputs(256, 64, g) for _ in range(1 if shared else n_w)]
    h = torch.stack([_hessian(x).float() for x in xs])
    h[-1, 5, :] = h[-1, :, 5] = 0.0  # a dead input column in one Hessian
    return w, h, xs


def _same(a, b) -> bool:
    return all(torch.equal(x, y) if x is not None else y is None for x, y in
               [(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), (a.scale, b.scale),
                (a.zero_point, b.zero_point), (a.g_idx, b.g_idx), (a.global_scale, b.global_scale)]
               if x is not None or y is not None) and a.scheme == b.scheme


@pytest.mark.parametrize("shared", [False, True], ids=["own-hessians", "one-hessian"])
@pytest.mark.parametrize("case", list(CASES))
def test_batch_is_bitwise_the_single_solves(case, shared):
    scheme, opts = CASES[case]
    w, h, _ = _inputs(4, shared)
    batched = gptq_quantize_batch(w, h, scheme, block_size=32, names=[f"e{e}" for e in range(4)], **opts)
    assert len(batched) == 4
    for e in range(4):
        alone = gptq_quantize(w[e], h[0 if shared else e], scheme, block_size=32, name=f"e{e}", **opts)
        assert _same(batched[e], alone), (case, e)
        assert batched[e].codes.shape == (32, 64) and batched[e].codes.is_contiguous()


@pytest.mark.parametrize("case", [dict(sym=True, group=16, act_order=True, static_groups=True),
                                  dict(sym=False, group=16, act_order=True, static_groups=False)])
def test_batch_matches_float64_reference(case):
    w, h, xs = _inputs(3, shared=False, seed=4)
    scheme = _scheme(4, case["sym"], case["group"])
    batched = gptq_quantize_batch(w, h, scheme, block_size=32, act_order=case["act_order"],
                                  static_groups=case["static_groups"])
    for e, qw in enumerate(batched):
        ref = ref_gptq(w[e], h[e].double(), scheme.weights, case["group"], case["act_order"], case["static_groups"])
        same = (qw.codes.double() == ref).double().mean().item()
        # float32 vs float64 may flip a code on a rounding boundary (the same bound as for one weight)
        assert same >= 0.97, (e, same)


def test_one_failing_hessian_is_retried_alone_and_named(caplog):
    w, h, _ = _inputs(3, shared=False)
    h[1] = -torch.eye(64)  # never positive definite: its damping grows until the retries run out
    with caplog.at_level(logging.WARNING, logger="quantkit.quantizers.gptq"), \
            pytest.raises(NumericsError) as err:
        gptq_quantize_batch(w, h, _scheme(4, True, 16), names=["a", "b", "c"])
    assert err.value.file == "b"
    assert caplog.records and all(r.args[0] == "b" for r in caplog.records)


def test_batch_refuses_row_blocks_straddling_weights():
    w, h, _ = _inputs(2, shared=True)
    with pytest.raises(ValueError, match="straddle"):
        gptq_quantize_batch(w[:, :24], h, preset_scheme("FP8_BLOCK_A16", block_size=16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["int4 g16 act-order static", "int4 asym g16 act-order dynamic (g_idx)",
                                  "NVFP4 (global scale per weight)"])
def test_batch_on_cuda_matches_the_single_solves(case, monkeypatch):
    """On CUDA (block loop as a CUDA graph) a batch is each weight's own solve: the captured
    batched loop replays exactly what the eager one computes, and against the single solves
    cuBLAS may round a product differently, which can flip a code on a rounding boundary
    (then that row takes another, equally good path): codes nearly all equal and the same
    output error."""
    scheme, opts = CASES[case]
    w, h, xs = _inputs(8, shared=False)
    w, h = w.cuda(), h.cuda()
    monkeypatch.setenv("QUANTKIT_TRITON", "0")  # the torch loop (the kernel: test_gptq_block_kernel.py)
    graphed = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
    monkeypatch.setenv("QUANTKIT_CUDA_GRAPHS", "0")
    eager = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
    for e in range(8):
        assert _same(graphed[e], eager[e]), e
        alone = gptq_quantize(w[e], h[e], scheme, block_size=32, **opts)
        assert (alone.codes.float() == graphed[e].codes.float()).float().mean() >= 0.97
        x = xs[e].cuda()

        def err(q):
            return torch.linalg.norm(x @ (w[e] - q.dequantize()).T).item()

        assert err(graphed[e]) <= 1.05 * err(alone)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_beside_a_thread_copying_off_the_device(caplog, monkeypatch):
    """The block loop's CUDA graph is captured while another thread copies tensors to the
    host (the engine's layer writer and export do, beside the next layer's solves): neither
    the copies nor the capture fail, and the solve is the eager one's."""
    import threading

    from quantkit.quantizers import gptq

    scheme, opts = CASES["int4 g16 act-order static"]
    w, h, _ = _inputs(5, shared=False, seed=11)  # a batch size no other test captured
    w, h = w.cuda(), h.cuda()
    monkeypatch.setenv("QUANTKIT_TRITON", "0")  # static groups would take the Triton kernel, not a graph
    gptq._GRAPHS.clear()
    src, stop, errors = torch.randn(4096, 4096, device="cuda"), threading.Event(), []

    def copy_off() -> None:
        try:
            while not stop.is_set():
                src.to("cpu")
        except BaseException as e:  # noqa: BLE001 (recorded for the assertion)
            errors.append(e)

    thread = threading.Thread(target=copy_off)
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="quantkit.quantizers.gptq"):
            graphed = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
    finally:
        stop.set()
        thread.join()
    assert not errors and "capture failed" not in caplog.text
    assert any(k[0] == 5 and v is not None for k, v in gptq._GRAPHS.items())
    gptq._GRAPHS.clear()
    monkeypatch.setenv("QUANTKIT_CUDA_GRAPHS", "0")
    eager = gptq_quantize_batch(w, h, scheme, block_size=32, **opts)
    for e in range(5):
        assert _same(graphed[e], eager[e]), e


def test_row_chunks_of_equal_experts_are_even():
    """Qwen3-30B-A3B's 256 gate/up matrices (768 x 2048) do not fit one stacked solve: two
    chunks of 128 (one shape, so one batched solve), not 170 and 86."""
    from quantkit.quantizers.gptq import MAX_STACKED_ELEMENTS, _row_chunks

    size = 768 * 2048
    chunks = _row_chunks([f"m{i}" for i in range(256)], [size] * 256, MAX_STACKED_ELEMENTS)
    assert [len(c) for c in chunks] == [128, 128] and 128 * size <= MAX_STACKED_ELEMENTS
    assert [n for c in chunks for n in c] == [f"m{i}" for i in range(256)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_wide_stack_is_factored_one_hessian_at_a_time_on_streams(monkeypatch):
    """From ``STREAMED_WIDTH`` a CUDA stack of Hessians is factored per Hessian on several
    streams: each factor is bitwise that Hessian's own, close to float64's, and a Hessian that
    is not positive definite is reported in its own ``info`` alone."""
    from quantkit.quantizers import gptq

    monkeypatch.setattr(gptq, "STREAMED_WIDTH", 256)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(6, 256, 700, device="cuda", generator=g) * torch.linspace(0.1, 4.0, 256, device="cuda")[:, None]
    h = x @ x.transpose(1, 2) / 700 + 1e-3 * torch.eye(256, device="cuda")
    h[3, 7, 7] = -1.0
    upper, info = gptq.upper_inverse_factor(h)
    assert info.tolist()[3] != 0 and [v for e, v in enumerate(info.tolist()) if e != 3] == [0] * 5
    for e in (0, 1, 2, 4, 5):
        alone, one = gptq.upper_inverse_factor(h[e:e + 1])
        assert int(one[0]) == 0 and torch.equal(upper[e], alone[0]), e
        ref = torch.linalg.cholesky(torch.linalg.inv(h[e].double()), upper=True)
        assert (upper[e].double() - ref).abs().max() / ref.abs().max() < 1e-4, e
