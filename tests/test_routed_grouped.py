"""The routed experts forward as grouped matrix products (issue 16, speed): the same outputs as
the per-expert loop, taken only where skipping the expert Linears' modules changes nothing."""

from __future__ import annotations

import pytest
import torch
from quantkit.graph import experts as experts_mod
from quantkit.graph import grouped
from quantkit.graph.experts import UnfusedExperts, split_fused
from torch.overrides import TorchFunctionMode

from tests.tiny_models import family_config

transformers = pytest.importorskip("transformers")

# Each family's fused experts class and the config field holding its number of experts.
FAMILIES = {
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts", "num_experts"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts", "num_local_experts"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Experts", "n_routed_experts"),
    "gpt_oss": ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts", "num_local_experts"),
}
EXPERTS, HIDDEN, TOP_K = 9, 64, 3
# Ops that make the host wait for the device (a GPU's launch queue stalls on each).
HOST_SYNCS = {"bincount", "tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
              "masked_select", "repeat_interleave"}


class _HostSyncs(TorchFunctionMode):
    """Records the calls of ``HOST_SYNCS`` made inside it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_SYNCS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def unfused_experts(family: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    experts: int = EXPERTS, hidden: int = HIDDEN, intermediate: int = 96) -> UnfusedExperts:
    """The family's fused experts module at tiny shape, random weights (biases too), unfused."""
    import importlib

    module, cls_name, field = FAMILIES[family]
    cls = getattr(importlib.import_module(module), cls_name)
    config = family_config(family, vocab=64, hidden=hidden, intermediate=2 * intermediate)
    setattr(config, field, experts)
    config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(len(family))
    fused = cls(config)
    state = {n: torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.3 for n, p in fused.named_parameters()}
    with torch.device("meta"):
        skeleton = cls(config)
    unfused = UnfusedExperts(skeleton).to_empty(device=device).to(dtype)
    per_expert = {}
    for name, t in state.items():
        per_expert.update(split_fused(unfused.layout, name, t))
    unfused.load_state_dict(per_expert, strict=True)
    return unfused


def routing(tokens: int, picked: int, experts: int = EXPERTS, seed: int = 0,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k indices among the first ``picked - 1`` experts and one index past the last expert
    (an expert-parallel sentinel, dropped) where ``picked - 1`` was drawn; router weights."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(picked, generator=gen)[:TOP_K] for _ in range(tokens)])
    idx[idx == picked - 1] = experts
    return idx.to(device), torch.rand(tokens, TOP_K, generator=gen).to(device)


def per_expert_loop(unfused: UnfusedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                    monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(UnfusedExperts, "_grouped", lambda self, x: False)
        return unfused(x, idx, w)


class _Calls:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def grouped_calls(monkeypatch) -> _Calls:
    calls = _Calls(experts_mod.grouped_linear)
    monkeypatch.setattr(experts_mod, "grouped_linear", calls)
    return calls


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grouped_routed_forward_is_the_per_expert_loop(family, chunked, monkeypatch, grouped_calls):
    """Bitwise on CPU for experts without biases (the same matmul per expert, each token's
    outputs summed in expert order); gpt-oss's biases are added after the grouped product where
    ``nn.Linear`` fuses them into its matmul: one rounding of float32 apart."""
    unfused = unfused_experts(family)
    x = torch.randn(101, HIDDEN, generator=torch.Generator().manual_seed(5))
    idx, w = routing(101, EXPERTS, seed=len(family))  # expert 8 never picked
    want = per_expert_loop(unfused, x, idx, w, monkeypatch)
    if chunked:  # at most two experts' parameters a chunk: five, the last (expert 8) without tokens
        expert_bytes = sum(p.numel() * p.element_size() for p in unfused[0].parameters())
        monkeypatch.setattr(grouped, "GROUPED_CHUNK_BYTES", 2 * expert_bytes + 1)
    with torch.no_grad():
        got = unfused(x, idx, w)
    projections = len(unfused.layout.projections)
    assert grouped_calls.n == projections * (4 if chunked else 1)
    assert want.abs().max() > 0.1
    if unfused.layout.has_bias:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    else:
        assert torch.equal(got, want)


def test_an_expert_without_tokens_in_a_whole_chunk_is_skipped(monkeypatch, grouped_calls):
    """Experts 5..8 get no tokens: the chunk of 6..8 runs no product."""
    unfused = unfused_experts("qwen3_moe")
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(1))
    idx, w = routing(40, 6, seed=2)  # experts 0..4 picked
    want = per_expert_loop(unfused, x, idx, w, monkeypatch)
    expert_bytes = sum(p.numel() * p.element_size() for p in unfused[0].parameters())
    monkeypatch.setattr(grouped, "GROUPED_CHUNK_BYTES", 3 * expert_bytes)
    with torch.no_grad():
        got = unfused(x, idx, w)
    assert grouped_calls.n == 3 * 2 and torch.equal(got, want)


@pytest.mark.parametrize("chunked", [False, True])
def test_llama4_grouped_routed_forward_is_the_per_expert_loop(chunked, monkeypatch, grouped_calls):
    """Llama 4's experts read each picked token scaled by its score from their own chunk of the
    block's input and write their own chunk of its output: the per-expert loop's outputs, one
    host sync a call (the loop waits once per picked expert). One expert a chunk, bitwise; all
    in one grouped call, to float32's last bit: on an AVX-512 machine MKL summed 7 of these
    888 outputs in another order in the grouped kernel than in the experts' own Linears (at
    most 7.6e-7 relative), which a routing or scaling error would exceed by far."""
    from tests.test_moe import _llama4_blocks

    _, block = _llama4_blocks(top_k=2, dtype=torch.float32)
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 5.0  # expert 4 never picked
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(UnfusedExperts, "_grouped", lambda self, x: False)
        want = block(x)[0]
    if chunked:  # one expert a chunk
        monkeypatch.setattr(grouped, "GROUPED_CHUNK_BYTES", 1)
    with torch.no_grad(), _HostSyncs() as syncs:
        got = block(x)[0]
    assert grouped_calls.n == 3 * (4 if chunked else 1) and syncs.seen == ["tolist"]
    assert want.abs().max() > 0.1
    if chunked:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_a_hooked_linear_sends_every_expert_through_its_module(monkeypatch, grouped_calls):
    """A forward hook on any expert Linear (a quantizer's statistics, activation fake-quant)
    must see its tokens: the whole call takes the per-expert loop."""
    unfused = unfused_experts("mixtral")
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(3))
    idx, w = routing(64, EXPERTS, seed=4)
    seen: list[torch.Tensor] = []
    unfused[2].up_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        unfused(x, idx, w)
    token, _ = torch.where(idx == 2)
    assert grouped_calls.n == 0 and len(seen) == 1 and torch.equal(seen[0], x[token])


def test_a_replaced_linear_is_called(grouped_calls):
    """A Linear that is no plain ``ExpertLinear`` (a scheme's own module) computes its own
    output: the call takes the per-expert loop."""

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    unfused = unfused_experts("qwen3_moe")
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(3))
    idx, w = routing(64, EXPERTS, seed=4)
    with torch.no_grad():
        before = unfused(x, idx, w)
        plain = unfused[1].down_proj
        doubled = Doubled(plain.in_features, plain.out_features, bias=False)
        doubled.load_state_dict(plain.state_dict())
        unfused[1].down_proj = doubled
        after = unfused(x, idx, w)
    token, pos = torch.where(idx == 1)
    change = torch.zeros_like(x).index_add_(0, token, unfused._expert(1, x[token]) / 2 * w[token, pos, None])
    assert grouped_calls.n == 3 and change.abs().max() > 0.01
    torch.testing.assert_close(after, before + change, rtol=1e-5, atol=1e-5)


def test_grouped_forward_waits_for_the_device_once_per_call(grouped_calls):
    unfused = unfused_experts("deepseek_v3")
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(3))
    idx, w = routing(64, EXPERTS, seed=4)

    with torch.no_grad(), _HostSyncs() as syncs:
        unfused(x, idx, w)
    assert grouped_calls.n == 3 and syncs.seen == ["tolist"]


def test_a_kernel_the_device_lacks_keeps_the_per_expert_loop(grouped_calls):
    """float64 (no grouped kernel on CPU) and autograd take the loop."""
    unfused = unfused_experts("qwen3_moe")
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(3))
    idx, w = routing(16, EXPERTS)
    with torch.no_grad():
        unfused.double()(x.double(), idx, w.double())
    unfused.float()(x, idx, w)  # grad enabled
    assert grouped_calls.n == 0


def test_cuda_takes_bf16_with_16_byte_rows_only(monkeypatch):
    monkeypatch.setattr(grouped, "_device_takes", lambda device, dtype: True)
    x = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    assert not grouped.grouped_takes(x, (64, 96))  # meta: nothing to compute
    cuda = torch.empty(2, 2, dtype=torch.bfloat16, device="cpu")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda _t: torch.device("cuda")))
    assert grouped.grouped_takes(cuda, (2048, 768)) and not grouped.grouped_takes(cuda, (2880, 92))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grouped_routed_forward_on_cuda_bf16(family, monkeypatch, grouped_calls):
    """bf16 on CUDA: the grouped kernel's accumulation order differs from cuBLAS's per-expert
    GEMMs and the chunk's ``index_add_`` sums a token's experts in any order: within bf16's
    rounding (a few units of 2^-8 relative) of the loop; one host sync per call."""
    unfused = unfused_experts(family, torch.bfloat16, "cuda", experts=32, hidden=256, intermediate=128)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=gen).to("cuda", torch.bfloat16)
    idx, w = routing(2048, 32, 32, device="cuda")
    want = per_expert_loop(unfused, x, idx, w.bfloat16(), monkeypatch)
    with torch.no_grad():
        unfused(x, idx, w.bfloat16())  # the kernel's first use tries it once
    grouped_calls.n = 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with torch.no_grad(), pytest.warns(UserWarning) as syncs:
            got = unfused(x, idx, w.bfloat16())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert grouped_calls.n == len(unfused.layout.projections)
    assert len([s for s in syncs if "synchroniz" in str(s.message)]) == 1
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.helpers import family_workspace

    return family_workspace(tmp_path_factory, "routed-grouped")


def test_a_quantized_moe_model_is_the_same_checkpoint_as_with_the_per_expert_loop(workspace, monkeypatch,
                                                                                   grouped_calls):
    """GPTQ with routed calibration: the quantized layer 0's routed forward feeds layer 1's
    statistics, so the checkpoint's bytes depend on it."""
    from tests.helpers import run_family

    root, text, model = workspace
    base = model("qwen3_moe")
    gptq = {"method": "gptq", "bits": 4, "group_size": 64}
    run_family(base, text, root / "grouped", gptq, all_experts=False)
    assert grouped_calls.n > 0
    with monkeypatch.context() as m:
        m.setattr(UnfusedExperts, "_grouped", lambda self, x: False)
        run_family(base, text, root / "loop", gptq, all_experts=False)
    written = sorted(p.name for p in (root / "loop").glob("*.safetensors"))
    assert written and written == sorted(p.name for p in (root / "grouped").glob("*.safetensors"))
    for name in written:
        assert (root / "grouped" / name).read_bytes() == (root / "loop" / name).read_bytes(), name
