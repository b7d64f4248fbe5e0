"""The first calls of the GPU libraries a decoder layer uses, made in a thread of their own
while the run validates its recipe and reads its text.

A process pays once for each library's and kernel's first call: cuBLAS's handle, cuSOLVER's,
the attention kernels, the GPTQ Triton kernel loaded from Triton's cache (compiled there the
first time on a machine). On an H200 these put 1.1 s into Mixtral-8x7B's first layer (the
first GPTQ solve 0.66 s against 0.02 s, the first calibration forward 1.14 s against 0.71 s;
``benchmarks/cold_start.py`` times each). Made here, on a stream of their own, they overlap
the validation instead. The calls are the same operations on tiny tensors: nothing they compute
is kept, and a failure is only logged (the layer's own call then fails, or pays, as before).
The engine starts after ``join``: the two threads never launch the same kernel for the first
time together.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch.nn.attention import sdpa_kernel

from .engine import ATTENTION_BACKENDS
from .quantizers import gptq_block_kernel
from .quantizers.base import QuantizerParams
from .quantizers.gptq import upper_inverse_factor

log = logging.getLogger(__name__)

Step = Callable[[], object]


class Warmup:
    """Steps run in order in one background thread, on its own CUDA stream where there is one."""

    def __init__(self, device: torch.device):
        self._device = device
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def add(self, steps: list[Step]) -> None:
        for step in steps:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="quantkit-warmup")
            self._pending.append(self._executor.submit(self._run, step))

    def _run(self, step: Step) -> None:
        try:
            if self._device.type == "cuda":
                with torch.cuda.device(self._device), torch.cuda.stream(torch.cuda.Stream(self._device)):
                    step()
                    torch.cuda.current_stream().synchronize()
            else:
                step()
        except Exception as e:  # the real call reports it
            log.debug("warm-up step %s failed: %s: %s", getattr(step, "__name__", step), type(e).__name__, e)

    def join(self) -> None:
        """Until every step has ended; then the thread ends."""
        for f in self._pending:
            f.result()
        self._pending = []
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def library_steps(device: torch.device, gptq_asym: bool | None) -> list[Step]:
    """Matrix products (16- and 32-bit), the inverse Hessian factor's Cholesky and triangular
    solve, and with ``gptq_asym`` (not None: the recipe runs GPTQ) the Triton column kernel of
    that symmetry. None on a CPU: its libraries have no first-call cost worth hiding."""
    if device.type != "cuda":
        return []

    def products() -> None:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            a = torch.ones(64, 64, device=device, dtype=dtype)
            a @ a

    # Every tensor's dtype is given: transformers sets the process's default dtype to the model's
    # while it builds one, which the main thread may be doing meanwhile. A bf16 block turned the
    # column kernel off for the whole process, and its torch loop rounds differently, so a run's
    # codes depended on the two threads' timing.
    def inverse_factor() -> None:
        h = torch.eye(64, device=device, dtype=torch.float32).unsqueeze(0) * 2
        upper_inverse_factor(h)

    steps: list[Step] = [products, inverse_factor]
    if gptq_asym is not None and gptq_block_kernel.available(device):
        def column_kernel() -> None:
            w = torch.zeros(1, gptq_block_kernel.ROWS_PER_PROGRAM, 128, device=device, dtype=torch.float32)
            hinv = torch.eye(128, device=device, dtype=torch.float32).unsqueeze(0)
            scale = torch.ones_like(w)
            gptq_block_kernel.quantize_block(w, hinv, scale, torch.zeros_like(w) if gptq_asym else None, 0.0, 15.0)

        steps.append(column_kernel)
    return steps


def attention_steps(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> list[Step]:
    """Causal attention of the model's head size and dtype under the engine's backends."""
    if device.type != "cuda":
        return []

    def attention() -> None:
        q = torch.zeros(1, heads, 64, head_dim, device=device, dtype=dtype)
        with sdpa_kernel(ATTENTION_BACKENDS):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    return [attention]


def start(device: torch.device, params: QuantizerParams) -> Warmup:
    """The library steps for a recipe's ``quantization`` section, started on ``device``."""
    warm = Warmup(device)
    asym = None
    uses_gptq = params.method == "gptq" or getattr(params, "weight_method", None) == "gptq"
    if uses_gptq and device.type == "cuda":
        ws = params.scheme().weights
        if ws is not None and ws.grid.type == "int":
            asym = not ws.symmetric
    warm.add(library_steps(device, asym))
    return warm
