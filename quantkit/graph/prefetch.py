"""Reading the next decoder layer while the current one is calibrated and solved.

A layer's load (reading its shard, copying and dequantizing its tensors onto the device) is
host work: on an H200 a Qwen3-30B-A3B layer spends a quarter of its time there. One background
thread reads layer i+1 while the main thread runs layer i's kernels, on its own CUDA stream so
its copies do not queue behind them.

The prefetch is an optimisation only: it reads the same tensors the same way, so a layer is
bitwise what a direct read gives; a read error is kept and raised when the main thread loads
that layer; a prefetch the device has no room for is not started, and one that ran out of
memory is dropped and the layer read again directly.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

# A prefetched layer may take at most this share of the device's free memory: the current
# layer's statistics take up to half of what is free when they start (``moe.STATISTICS_SHARE``)
# and its batched solves a share of the rest, while the next layer arrives.
PREFETCH_SHARE = 0.25


class PrefetchCancelled(Exception):
    """Raised inside the reader when the prefetch is cancelled (never seen outside)."""


LayerRead = Callable[[threading.Event], nn.Module]


def free_bytes(device: torch.device) -> int:
    """Memory a prefetch may use on ``device``: the GPU's free memory (not what torch's
    allocator keeps cached for the current layer); none on the CPU: there the read is host
    work on the cores the layer's own compute uses, and overlapping the two did not shorten a
    layer (``benchmarks/layer_load.py --prefetch``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return 0


def fits(need: int, device: torch.device) -> bool:
    free = free_bytes(device)
    return free > 0 and need <= PREFETCH_SHARE * free


class LayerPrefetch:
    """Layer ``index``'s state read by ``read`` on a background thread."""

    def __init__(self, index: int, read: LayerRead, device: torch.device):
        self.index = index
        self._stop = threading.Event()
        self._layer: nn.Module | None = None
        self._error: BaseException | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, args=(read,), name=f"quantkit-prefetch-layer-{index}",
                                        daemon=True)
        self._thread.start()

    def _run(self, read: LayerRead) -> None:
        try:
            if self._stream is None:
                self._layer = read(self._stop)
                return
            with torch.cuda.stream(self._stream):
                layer = read(self._stop)
            self._stream.synchronize()
            self._layer = layer
        except BaseException as e:  # kept for the main thread, which raises it when it loads the layer
            self._error = e

    def result(self) -> nn.Module | None:
        """The layer, once read; its read error raised; None when the device ran out of memory
        for it (the caller reads the layer itself)."""
        self._thread.join()
        if isinstance(self._error, torch.OutOfMemoryError):
            log.info("prefetch of layer %d ran out of device memory; reading it directly", self.index)
            self._error = None  # its traceback holds the tensors read so far
            return None
        if self._error is not None:
            raise self._error
        layer, self._layer = self._layer, None
        if self._stream is not None and layer is not None:
            # Allocated on the prefetch stream, used and freed on the main one: the allocator
            # must not hand their memory to the next prefetch while the main stream's kernels run.
            current = torch.cuda.current_stream(self._stream.device)
            for t in [*layer.parameters(), *layer.buffers()]:
                t.record_stream(current)
        return layer

    def cancel(self) -> None:
        """Stop reading (at the next tensor) and wait for the thread; its tensors are dropped."""
        self._stop.set()
        self._thread.join()
        self._layer = self._error = None
