"""Test helpers shared by the quantizer tests: a fake LayerCalibration, tiny real decoder
layers built from a config with their derived layer graphs, and inputs with a chosen
covariance."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from quantkit.graph import LayerGraph
from quantkit.seeding import generator


class FakeCalibration:
    """Holds the layer's calibration inputs and streams them through it with the engine's
    hooks (``run_calibration``). Each batch is a tensor (positional
    input) or a dict of keyword arguments. ``runs`` counts passes; ``hook_calls`` counts calls
    per statistic. With a ``world`` of several ranks it streams this rank's share, as the
    engine does."""

    def __init__(self, layer: nn.Module, batches: list, seed: int = 0, world=None) -> None:
        from quantkit.distributed import SINGLE

        self.world = world or SINGLE
        self.layer = layer
        self.batches = self.world.shard(batches)
        self.seed = seed
        self.runs = 0
        self.hook_calls: dict[str, int] = {}

    def generator(self, name: str) -> torch.Generator:
        return generator(self.seed, 0, name)

    def expert_owner(self, name: str) -> int | None:  # statistics reduced, as before ownership existed
        return None

    def observe(self, stats: Mapping[str, object], later=()) -> None:
        self.runs += 1

        def counted(name, hook):
            def h(x):
                self.hook_calls[name] = self.hook_calls.get(name, 0) + 1
                hook(x)

            return h

        self.run({n: counted(n, st.add) for n, st in stats.items()})
        for st in stats.values():
            st.reduce(self.world)

    def run(self, hooks: Mapping[str, object]) -> None:
        """Every batch through the layer, ``hooks`` fed the raw inputs (what the tests
        compute reference statistics from)."""
        from quantkit.engine import run_calibration

        def forward():
            for b in self.batches:
                self.layer(**b) if isinstance(b, dict) else self.layer(b)

        run_calibration(self.layer, hooks, forward)


def quantize_in_one_pass(quantizer, layer: nn.Module, batches: list, graph: LayerGraph) -> dict:
    """``quantizer`` on ``layer`` with its calibration ``batches``: it must calibrate, and in
    exactly one pass over them."""
    assert quantizer.needs_calibration
    calib = FakeCalibration(layer, batches)
    out = quantizer.quantize_layer(layer, graph, calib)
    assert calib.runs == 1
    return out


def mask_router(gate: nn.Module, masked: Callable[[torch.Tensor], Iterable[int]]) -> None:
    """The Qwen3-MoE router (its own computation) with the experts ``masked(h)`` names never
    picked for its input ``h`` ``[tokens, hidden]``."""
    import torch.nn.functional as F

    def forward(hidden_states):
        h = hidden_states.reshape(-1, gate.hidden_dim)
        logits = F.linear(h, gate.weight)
        for e in masked(h):
            logits[:, e] = float("-inf")
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, idx = torch.topk(probs, gate.top_k, dim=-1)
        if gate.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    gate.forward = forward


def mask_llama4_router(router: nn.Module, masked: Callable[[torch.Tensor], Iterable[int]]) -> None:
    """Llama 4's router (its own computation) with the experts ``masked(h)`` names never picked
    for its input ``h`` ``[tokens, hidden]``: their logits are -inf, so their would-be scores
    are zero too."""
    import torch.nn.functional as F

    def forward(hidden_states):
        logits = F.linear(hidden_states, router.weight)
        for e in masked(hidden_states):
            logits[:, e] = float("-inf")
        top, idx = torch.topk(logits, router.top_k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, idx, top)
        return torch.sigmoid(scores.float()).to(scores.dtype), logits

    router.forward = forward


def group_inputs(layer: nn.Module, batches: list, graph: LayerGraph) -> dict[str, list[torch.Tensor]]:
    """Every input group's calibration inputs ``[tokens, in]`` in float64, one per batch,
    keyed by the group's key Linear: what a quantizer observing that input sees."""
    seen: dict[str, list[torch.Tensor]] = {}
    FakeCalibration(layer, batches).run(
        {g.key: (lambda x, k=g.key: seen.setdefault(k, []).append(x.double())) for g in graph.groups})
    return seen


def correlated_inputs(n: int, d: int, generator: torch.Generator, outliers: int = 0, outlier_gain: float = 50.0) -> torch.Tensor:
    """``[n, d]`` float32 inputs with a random covariance (what makes GPTQ beat RTN);
    optionally a few channels scaled by ``outlier_gain`` (what AWQ and SmoothQuant target)."""
    a = torch.randn(d, d, generator=generator) / d**0.5
    x = torch.randn(n, d, generator=generator) @ (a + 0.5 * torch.eye(d))
    if outliers:
        idx = torch.randperm(d, generator=generator)[:outliers]
        x[:, idx] *= outlier_gain
    return x


def tiny_llama_config(gqa: bool = False, **overrides):
    from transformers import LlamaConfig

    cfg = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        head_dim=16,
        num_hidden_layers=1,
        vocab_size=128,
        rms_norm_eps=1e-6,
    )
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    return config


def graph_of(config) -> LayerGraph:
    """The layer graph quantkit derives for a config's decoder layer (from the model's code)."""
    from transformers import AutoModel

    from quantkit.graph import derive_layer_graph
    from quantkit.graph.skeleton import build_meta

    decoder = build_meta(AutoModel._model_mapping[type(config)], config, torch.float32)
    return derive_layer_graph(decoder, "layers", 0)


def llama_graph(gqa: bool = False) -> LayerGraph:
    return graph_of(tiny_llama_config(gqa))


def tiny_llama_layer(seed: int = 0, gqa: bool = False, batches: int = 2, seq: int = 16, outliers: int = 0):
    """A real LlamaDecoderLayer with random weights (norms too), its calibration batches as
    keyword arguments, and its config as the dict a config.json gives."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    config = tiny_llama_config(gqa)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.copy_(0.5 + torch.rand_like(norm.weight))
    rope = LlamaRotaryEmbedding(config)
    g = torch.Generator().manual_seed(seed + 1)
    data = []
    for _ in range(batches):
        x = torch.randn(1, seq, config.hidden_size, generator=g)
        if outliers:
            x[..., :outliers] *= 20.0
        pos = torch.arange(seq).unsqueeze(0)
        data.append({"hidden_states": x, "position_embeddings": rope(x, pos), "position_ids": pos})
    return layer, data, config.to_dict()


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_vllm_check():
    return load_benchmark("vllm_check")


def family_workspace(tmp_path_factory, name: str):
    """(root, a local calibration text file, ``model(family)``): tiny two-layer models of each
    family, built on first use and shared by a test module."""
    from tests.tiny_models import make_tiny_model, write_text_file

    root = tmp_path_factory.mktemp(name)
    text = write_text_file(root / "text.jsonl")
    made: dict = {}

    def model(family: str):
        if family not in made:
            made[family] = make_tiny_model(root / family, arch=family, layers=2, hidden=128, intermediate=256,
                                           heads=4, kv_heads=2, seed=len(made))
        return made[family]

    return root, text, model


def run_family(base, text, out, quantization: dict, **calibration) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """A small full run of a family's tiny model (CPU, 4 x 48 calibration tokens, 2 x 40
    evaluation): its report, and each layer's fake-quantized state as the run left it."""
    from quantkit.pipeline import run
    from quantkit.recipe import make_recipe

    states: dict[int, dict[str, torch.Tensor]] = {}
    report = run(make_recipe({
        "model": {"id": str(base)},
        "quantization": quantization,
        "calibration": {"source": str(text), "num_samples": 4, "max_seq_length": 48, "batch_size": 4, **calibration},
        "evaluate": {"source": str(text), "num_samples": 2, "max_seq_length": 40},
        "export": {"output_dir": str(out)},
        "device": "cpu",
    }), quiet=True, on_layer=lambda i, layer, _q: states.setdefault(
        i, {k: v.detach().clone() for k, v in layer.state_dict().items()}))
    return report, states
