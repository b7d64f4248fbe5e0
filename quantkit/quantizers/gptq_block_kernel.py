"""GPTQ's column loop over one block as one Triton kernel, for fixed (per-column) scales on
an int grid.

The loop is row-parallel: each row's codes depend only on that row and the shared block of
``H⁻¹``'s upper factor. The torch loop (``gptq._quantize_block``, captured as a CUDA graph)
still runs about ten small kernels per column, each touching only ``E × rows`` floats: their
latency, not their arithmetic, is the loop's time. Here each program keeps a tile of rows × the
block's columns in registers and walks the columns itself: one launch per block. Whole solves on
an H200 (``benchmarks/gptq_column_loop.py``): Mixtral's eight down_projs 1.105 -> 0.827 s,
Llama-3.1-70B's q+k+v 0.169 -> 0.055 s.

Numerics are the torch loop's: ``c = clamp(round(w / s + z))`` (ties to even), ``err = (w − (c − z)·s) / d``,
``w_j −= err · U_ij`` for the block's later columns ``j``; divisions round to nearest as
torch's do. Only the order in which a column's updates are summed differs (float32 rounding).
Needs a CUDA device and Triton (shipped with CUDA builds of torch); ``available`` says whether
a block can take this path, and the first failure to compile or launch turns it off for the
process with a warning (the torch loop computes the same thing). ``QUANTKIT_TRITON=0`` turns
it off. Under ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (the tests' way to
check it without a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger(__name__)

ROWS_PER_PROGRAM = 32
"""Rows of one program's tile: with a 128-column block, 4096 floats in registers."""

_state: dict[str, object] = {}


def _kernel():
    """The kernel (compiled on first launch), or None where Triton is missing or a launch failed."""
    if "kernel" not in _state:
        try:
            from .gptq_block_triton import gptq_block
        except ImportError:
            gptq_block = None
        _state["kernel"] = gptq_block
    return _state["kernel"]


def available(device: torch.device) -> bool:
    """Whether a block on ``device`` runs here: CUDA (or any device under Triton's
    interpreter), Triton installed, not turned off, and no earlier launch failed."""
    if os.environ.get("QUANTKIT_TRITON", "1") == "0":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted) and _kernel() is not None


def quantize_block(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   qmin: float, qmax: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes (as floats) and scaled errors ``[E, rows, n]`` of one GPTQ block.

    ``w`` ``[E, rows, n]`` are the block's columns of ``E`` weights (any strides; not written),
    ``hinv`` ``[E or 1, n, n]`` the block's diagonal block of the upper factor, ``scale`` and
    ``zero`` (None: symmetric) ``[E, rows, n]`` each column's effective scale and zero point
    (views of one layout: the kernel reads both with ``scale``'s strides).
    None when the kernel failed (logged once; the caller runs the torch loop).

    Blocks not in float32 are a caller's mistake, not the kernel's: refused with a TypeError
    before the launch, so the kernel stays on for the process's real (float32) solves. A bf16
    warm-up block once turned it off for a whole run, and the torch loop rounds differently.
    """
    given = {"w": w, "hinv": hinv, "scale": scale, "zero": zero}
    wrong = {name: t.dtype for name, t in given.items() if t is not None and t.dtype != torch.float32}
    if wrong:
        raise TypeError(f"GPTQ's column kernel takes float32 blocks; got {wrong}")
    kernel = _kernel()
    n_w, rows, n = w.shape
    codes = torch.empty(n_w, rows, n, device=w.device, dtype=torch.float32)
    err = torch.empty_like(codes)
    grid = (-(-rows // ROWS_PER_PROGRAM), n_w)
    z = zero if zero is not None else scale  # not read when symmetric
    h_stride_e = hinv.stride(0) if hinv.shape[0] > 1 else 0
    # Triton launches on the current device: the tensors' (a rank's own GPU).
    place = torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext()
    try:
        with place:
            kernel[grid](
                w, scale, z, hinv, codes, err, rows, n,
                w.stride(0), w.stride(1), w.stride(2),
                scale.stride(0), scale.stride(1), scale.stride(2),
                h_stride_e, hinv.stride(1), hinv.stride(2),
                float(qmin), float(qmax),
                ASYM=zero is not None, BLOCK_R=ROWS_PER_PROGRAM, BLOCK_N=1 << (n - 1).bit_length(),
            )
    except Exception as e:  # a compiler or driver missing here: the torch loop is the fallback
        log.warning("GPTQ: the Triton column kernel failed (%s: %s); using the torch loop", type(e).__name__, e)
        _state["kernel"] = None
        return None
    return codes, err
