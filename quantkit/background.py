"""One job at a time in a background thread, its error raised in the thread that waits.

The work folder's layer writes and the streaming export both overlap the next layer's GPU
work this way: the next job waits for the previous one, so at most one finished layer waits
in memory for each. The thread is not a daemon: a job under way when the run fails still
ends (a layer file is never half-written), and ``close`` joins it.

Where the process uses CUDA, a job's device work (packing, copies off the device) runs on the
worker's own stream, after the work the submitting thread had queued on its stream when it
submitted. On the submitter's stream instead (the default stream, the engine's), each copy off
the device waited for the engine's queued kernels and then held them up: the work folder's
copies did so for a layer's worth of codes while the next layer was solved.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable

import torch


class OneInFlight:
    def __init__(self, thread_name: str):
        self._name = thread_name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` once the job in flight has ended; raise that job's error instead
        if it failed. Its device work follows what this thread has queued so far."""
        self.wait()
        ready = None
        if torch.cuda.is_initialized():  # the current device is per thread: the submitter's
            ready = torch.cuda.current_device(), torch.cuda.Event()
            ready[1].record(torch.cuda.current_stream())
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._pending = self._executor.submit(self._run, ready, fn, *args)

    def _run(self, ready: tuple[int, torch.cuda.Event] | None, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on this worker's stream of the submitter's device, after ``ready``'s
        event, finished on the device before it returns (the job's tensors, some allocated on
        the submitter's stream, are dropped after that)."""
        if ready is None:
            return fn(*args)
        device, event = ready
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(event)
            try:
                return fn(*args)
            finally:
                stream.synchronize()

    def wait(self) -> None:
        """Until the job in flight has ended; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def settle(self) -> None:
        """Until the job in flight has ended, whichever way (after a failure whose own error wins)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            futures_wait([pending])

    def close(self) -> None:
        """Settle, then end the thread."""
        self.settle()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
