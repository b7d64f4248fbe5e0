"""One job at a time in a background thread, its error raised in the thread that waits.

The work folder's layer writes and the streaming export both overlap the next layer's GPU
work this way: the next job waits for the previous one, so at most one finished layer waits
in memory for each. The thread is not a daemon: a job under way when the run fails still
ends (a layer file is never half-written), and ``close`` joins it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable


class OneInFlight:
    def __init__(self, thread_name: str):
        self._name = thread_name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` once the job in flight has ended; raise that job's error instead
        if it failed."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._pending = self._executor.submit(fn, *args)

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
