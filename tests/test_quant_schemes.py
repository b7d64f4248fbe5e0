"""FP8 block, NVFP4 (tensor groups, global scales), MXFP4 (E8M0) and W4AFP8 in RTN, GPTQ and
activation simulation, against float64 references written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.activations import fake_quantize_activation
from quantkit.presets import PRESETS, preset_scheme
from quantkit.quantizers import QUANTIZERS
from quantkit.quantizers.gptq import GPTQParams, gptq_quantize
from quantkit.quantizers.rtn import RTNParams, quantize_rtn

from .helpers import (FakeCalibration, correlated_inputs, group_inputs, llama_graph, quantize_in_one_pass,
                      tiny_llama_layer)
from .test_grids import _ref_e2m1

LLAMA = llama_graph()

F8 = torch.float8_e4m3fn


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-448, 448).to(F8).double()


def ref_nvfp4(w: torch.Tensor, gscale: float | None = None):
    """NVFP4 from its definition: global ``2688 / max|w|``; per 16 columns an E4M3 scale of
    ``amax / 6 · global``; codes the nearest E2M1 value of ``w / (scale / global)``."""
    w = w.double()
    rows, cols = w.shape
    g = 448 * 6 / w.abs().max().item() if gscale is None else gscale
    amax = w.reshape(rows, cols // 16, 16).abs().amax(-1)
    s = _e4m3(amax / 6 * g)
    eff = (s.float() / torch.tensor(g, dtype=torch.float32)).double().repeat_interleave(16, 1)
    codes = _ref_e2m1((w.float() / eff.float()).double().flatten()).reshape(rows, cols)
    return codes, s, g, codes * eff


def ref_mxfp4(w: torch.Tensor):
    w = w.double()
    rows, cols = w.shape
    amax = w.reshape(rows, cols // 32, 32).abs().amax(-1)
    exps = [[math.floor(math.log2(a)) + (a / 2 ** math.floor(math.log2(a)) >= 1.75) - 2 for a in r] for r in amax.tolist()]
    s = torch.tensor(exps, dtype=torch.float64).exp2()
    eff = s.repeat_interleave(32, 1)
    codes = _ref_e2m1((w.float() / eff.float()).double().flatten()).reshape(rows, cols)
    return codes, s, codes * eff


def ref_fp8_block(w: torch.Tensor, b: int):
    w = w.double()
    rows, cols = w.shape
    s = torch.zeros(math.ceil(rows / b), math.ceil(cols / b), dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = w[i * b:(i + 1) * b, j * b:(j + 1) * b].abs().max() / 448
    eff = s.float().repeat_interleave(b, 0)[:rows].repeat_interleave(b, 1)[:, :cols]
    codes = (w.float() / eff).to(F8).double()
    return codes, s, codes * eff.double()


def _weight(seed: int, rows: int = 48, cols: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) + 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_rtn_nvfp4_matches_definition(seed):
    w = _weight(seed)
    qw = quantize_rtn(w, PRESETS["NVFP4A16"])
    codes, s, g, deq = ref_nvfp4(w)
    assert qw.codes.dtype == F8 and qw.zero_point is None
    torch.testing.assert_close(qw.codes.double(), codes, rtol=0, atol=0)
    torch.testing.assert_close(qw.scale.double(), s, rtol=0, atol=0)
    assert qw.global_scale.shape == (1,) and qw.global_scale.item() == pytest.approx(g, rel=1e-6)
    torch.testing.assert_close(qw.dequantize().double(), deq, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", [2, 3])
def test_rtn_mxfp4_matches_definition(seed):
    w = _weight(seed, cols=128)
    qw = quantize_rtn(w, PRESETS["MXFP4A16"])
    codes, s, deq = ref_mxfp4(w)
    torch.testing.assert_close(qw.codes.double(), codes, rtol=0, atol=0)
    torch.testing.assert_close(qw.scale.double(), s, rtol=0, atol=0)
    assert qw.global_scale is None
    torch.testing.assert_close(qw.dequantize().double(), deq, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(64, 96), (80, 72)], ids=["whole-blocks", "partial-edge-blocks"])
def test_rtn_fp8_block_matches_definition(shape):
    w = _weight(4, *shape)
    qw = quantize_rtn(w, preset_scheme("FP8_BLOCK", block_size=32))
    codes, s, deq = ref_fp8_block(w, 32)
    assert qw.scale.shape == s.shape
    torch.testing.assert_close(qw.scale.double(), s.float().double(), rtol=0, atol=0)
    torch.testing.assert_close(qw.codes.double(), codes, rtol=0, atol=0)
    torch.testing.assert_close(qw.dequantize().double(), deq, rtol=1e-7, atol=0)


def test_rtn_quantizer_ties_global_scales_across_fused_shards():
    """q/k/v (and gate/up) share one NVFP4 global scale, from the largest weight of the set:
    vLLM fuses them into one matrix with one global scale."""
    layer, data, cfg = tiny_llama_layer(seed=1)
    q = QUANTIZERS["rtn"](RTNParams.model_validate({"scheme": "NVFP4A16"}), cfg)
    assert not q.needs_calibration
    out = q.quantize_layer(layer, LLAMA, FakeCalibration(layer, data))
    for g in LLAMA.groups:
        amax = max(layer.get_submodule(n).weight.abs().max().item() for n in g.linears)
        for n in g.linears:
            assert out[n].global_scale.item() == pytest.approx(2688 / amax, rel=1e-6)
            codes, s, _, _ = ref_nvfp4(layer.get_submodule(n).weight.data, out[n].global_scale.item())
            torch.testing.assert_close(out[n].codes.double(), codes, rtol=0, atol=0)


def test_nvfp4_w4a4_input_global_scales_and_activation_rounding():
    layer, data, cfg = tiny_llama_layer(seed=2, batches=3)
    q = QUANTIZERS["rtn"](RTNParams.model_validate({"scheme": "NVFP4"}), cfg)
    out = quantize_in_one_pass(q, layer, data, LLAMA)
    seen = group_inputs(layer, data, LLAMA)
    for g in LLAMA.groups:
        x = torch.cat(seen[g.key])
        for n in g.linears:
            assert out[n].input_global_scale.item() == pytest.approx(2688 / x.abs().max().item(), rel=1e-6)
    # The simulated activation rounding is NVFP4 per 16-wide token group with that global scale.
    qw = out["mlp.down_proj"]
    x = torch.cat(seen["mlp.down_proj"]).float()
    got = fake_quantize_activation(x, qw.scheme.input_activations, None, qw.input_global_scale)
    _, _, _, want = ref_nvfp4(x, qw.input_global_scale.item())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_fp8_block_activations_round_per_token_group():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 96, generator=g)
    x[..., 7] *= 50
    act = preset_scheme("FP8_BLOCK", block_size=32).input_activations
    got = fake_quantize_activation(x, act, None)
    xd = x.reshape(10, 3, 32).double()
    s = (xd.abs().amax(-1, keepdim=True) / 448).float()
    want = ((xd.float() / s).to(F8).float() * s).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


SCHEMES = {
    "NVFP4A16": PRESETS["NVFP4A16"],
    "MXFP4A16": PRESETS["MXFP4A16"],
    "FP8_BLOCK": preset_scheme("FP8_BLOCK", block_size=32),
    "W4AFP8": preset_scheme("W4AFP8", group_size=32),
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_gptq_with_a_diagonal_hessian_is_rtn(name):
    """Without correlation GPTQ has no error to push onward: every grid, scale format and
    layout must then give RTN's codes and scales exactly."""
    scheme = SCHEMES[name]
    w = _weight(5, 64, 128)
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(6)) + 0.5)
    qw = gptq_quantize(w, h, scheme, block_size=64)
    rtn = quantize_rtn(w, scheme)
    assert qw.codes.dtype == rtn.codes.dtype
    torch.testing.assert_close(qw.codes.float(), rtn.codes.float(), rtol=0, atol=0)
    torch.testing.assert_close(qw.scale, rtn.scale, rtol=0, atol=0)
    assert (qw.global_scale is None) == (rtn.global_scale is None)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_gptq_beats_rtn_on_every_grid(name):
    scheme = SCHEMES[name]
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=g)
    x = correlated_inputs(1024, 128, g)
    h = 2.0 / x.shape[0] * x.T @ x
    qw = gptq_quantize(w, h, scheme, block_size=64)
    rtn = quantize_rtn(w, scheme)

    def err(q):
        return torch.linalg.norm(x.double() @ (w.double() - q.dequantize().double()).T).item()

    assert err(qw) < 0.9 * err(rtn)
    values = qw.codes.float()
    if scheme.weights.type == "float" and scheme.weights.num_bits == 4:
        assert torch.equal(values.double(), _ref_e2m1(values.double().flatten()).reshape(values.shape))


def test_gptq_nvfp4_matches_float64_reference():
    """GPTQ's column loop with NVFP4 groups, written out in float64: each group's E4M3 scale
    is taken from its error-updated columns, under the global scale of the original weight."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(16, 64, generator=g)
    x = correlated_inputs(256, 64, g)
    h = (2.0 / 256 * x.T.double() @ x.double())
    qw = gptq_quantize(w, h.float(), PRESETS["NVFP4A16"], block_size=32)
    W, H = w.double().clone(), h.clone()
    H += 0.01 * torch.diag(H).mean() * torch.eye(64, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    gs = 2688 / w.abs().max().item()
    codes = torch.zeros_like(W)
    for j in range(64):
        if j % 16 == 0:
            s = _e4m3(W[:, j:j + 16].abs().amax(1, keepdim=True) / 6 * gs) / gs
        q = _ref_e2m1((W[:, j] / s[:, 0]).float().double())
        codes[:, j] = q
        err = (W[:, j] - q * s[:, 0]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    same = (qw.codes.double() == codes).double().mean().item()
    assert same >= 0.97, same


def test_gptq_quantizer_stacks_fused_shards_under_one_global_scale():
    layer, data, cfg = tiny_llama_layer(seed=3)
    q = QUANTIZERS["gptq"](GPTQParams.model_validate({"scheme": "NVFP4A16"}), cfg)
    out = q.quantize_layer(layer, LLAMA, FakeCalibration(layer, data))
    for grp in LLAMA.groups:
        amax = max(layer.get_submodule(n).weight.abs().max().item() for n in grp.linears)
        for n in grp.linears:
            assert out[n].global_scale.item() == pytest.approx(2688 / amax, rel=1e-6)
            rows, cols = layer.get_submodule(n).weight.shape
            assert out[n].scale.shape == (rows, cols // 16)
