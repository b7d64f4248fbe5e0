"""The plan's result, typed, and the table it prints as."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..gpus import GiB
from .budget import SchemePlan
from .quantize import QuantizeMemory


@dataclass
class PlanResult:
    """A plan for one model on one GPU type: a row per precision and a recommendation.

    In a notebook it renders as a table; ``to_json()`` gives every figure in bytes.
    """

    model: str
    architecture: str
    parameters: int
    max_position_embeddings: int
    gpu: str
    gpu_memory_bytes: int
    gpus: int
    batch: int
    context: int | None  # as asked; None means "as long as fits"
    required_context: int
    kv_cache_dtype: str
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    max_num_seqs: int
    rows: list[SchemePlan]
    recommended: str | None
    serve_command: str | None
    notes: list[str] = field(default_factory=list)
    quantize_memory: QuantizeMemory | None = None  # the largest layer, per GPU, for a recipe's quantizer
    experts: int = 0  # experts per MoE layer (0: dense)
    moe_layers: int = 0

    def row(self, scheme: str) -> SchemePlan:
        for r in self.rows:
            if r.scheme == scheme:
                return r
        raise KeyError(scheme)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        return format_plan_table(self)

    def __str__(self) -> str:
        return self.to_table()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.to_table())

    def _repr_markdown_(self) -> str:
        return "```\n" + self.to_table() + "\n```"



def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan_table(result: PlanResult) -> str:
    """The plan as a fixed-width table, one row per precision, then notes and the command."""
    r = result
    lines = [
        f"{r.model}: {r.architecture}, {r.parameters / 1e9:.2f} B parameters, max context {r.max_position_embeddings}",
        f"{r.gpus} x {r.gpu} ({_gib(r.gpu_memory_bytes)} GiB visible to CUDA), gpu_memory_utilization "
        f"{r.gpu_memory_utilization:g}, batch {r.batch}, context {r.context or 'longest'}, KV cache {r.kv_cache_dtype}",
        f"activation allowance assumes vLLM defaults max_num_batched_tokens={r.max_num_batched_tokens}, "
        f"max_num_seqs={r.max_num_seqs}; GiB per GPU",
        "",
    ]
    header = ("scheme", "weights", "emb/head/norm", "KV/token", "activ.", "KV budget", "total", "max len", "fits")
    rows = [header]
    for s in r.rows:
        name = s.label + ("" if s.native else " *")
        rows.append((
            name,
            _gib(s.weight_bytes),
            _gib(s.unquantized_bytes),
            f"{s.kv_bytes_per_token / 1024:.0f} KiB",
            _gib(s.activation_bytes),
            _gib(max(s.kv_budget_bytes, 0)),
            _gib(s.total_bytes),
            str(s.max_model_len),
            ("yes" if s.fits else "no") + (" <-" if s.scheme == r.recommended else ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    if any(not s.native for s in r.rows):
        lines.append("* no native vLLM kernel for this scheme on this GPU (see the notes)")
    lines.append("")
    lines.append(f"recommended: {r.recommended or 'none'}")
    if r.experts:
        lines.append(f"Mixture-of-Experts: {r.experts} experts in {r.moe_layers} of the layers (weights above count "
                     "every expert: vLLM holds them all)")
    m = r.quantize_memory
    if m is not None:
        lines += quantize_lines(m, r.gpus, bool(r.experts))
    lines += [f"note: {n}" for n in r.notes]
    if r.serve_command:
        lines.append(r.serve_command)
    return "\n".join(lines)


def quantize_lines(m: QuantizeMemory, gpus: int, experts: bool) -> list[str]:
    """The quantization-time need: its sum, then what the statistics and the float stream are."""
    c = m.calibrating
    where = "on one device" if gpus == 1 else f"per device of `quantkit run --gpus {gpus}`"
    if not c.statistics and not c.float_stream:
        return [f"quantize ({c.method}, {c.recipe}; no calibration): ~{_gib(m.total)} GiB {where} for its largest "
                f"layer: weights {_gib(m.layer)} + codes {_gib(m.codes)}"]
    parts = [f"weights {_gib(m.layer)}", f"codes {_gib(m.codes)}", f"statistics {_gib(m.hessians)}",
             f"activations {_gib(m.activations)}"]
    if c.float_stream:
        parts += [f"float stream {_gib(m.float_activations)}",
                  f"the larger of solve {_gib(m.solve)} and paired inputs {_gib(m.paired_inputs)}"]
    else:
        parts.append(f"solve {_gib(m.solve)}")
    if c.sequential:
        parts.append(f"sequential stages {_gib(m.substitutes)}")
    lines = [f"quantize ({c.method}, {c.recipe}, {c.samples} x {c.seq_len} calibration tokens): ~{_gib(m.total)} "
             f"GiB {where} for its largest layer: " + " + ".join(parts)]
    told = f"  statistics: float32 [in, in] per input group: {' and '.join(c.statistics)}"
    if experts:
        told += (f" (under routed calibration, per expert's gate/up and down_proj: {_gib(m.per_expert_hessians)} "
                 "GiB)")
    lines.append(told)
    if c.target_matrices:
        lines.append(f"  solve: the larger of GPTQ's working set and the {c.target_matrices} float32 [in, in] "
                     "an input feedback target takes before its solve (the widest input)")
    if c.float_stream:
        lines.append("  float stream: the float model's calibration hidden states, kept beside the quantized "
                     f"model's and as large; paired inputs: every input group's float-stream input for one batch "
                     f"({c.batch} x {c.seq_len} tokens), kept until the quantized pass pairs it")
    if c.sequential:
        lines.append("  sequential stages: the quantized stages' weights, put into the layer for the later stages' "
                     "passes, and the float weights put aside meanwhile (16 bits each)")
    return lines
