"""Device tensors brought to the host through page-locked memory.

A copy into pageable memory goes through the CUDA driver's staging buffer: several times
slower, and the calling thread makes the second copy. Page-locked buffers come from torch's
caching host allocator, so a run pays for each size once; it keeps every block it handed out
and rounds sizes up to a power of two, so tensors above ``PINNED_BYTES`` (a rotated model's
embedding) take the pageable path.
"""

from __future__ import annotations

import torch

PINNED_BYTES = 256 << 20


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host (itself, detached, when it is there already), its copy finished."""
    t = t.detach()
    if t.device.type != "cuda" or t.numel() * t.element_size() > PINNED_BYTES:
        return t.to("cpu")
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return out
