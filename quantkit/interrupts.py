"""Ctrl-C, SIGTERM and a full disk end a run with one line and nothing half-written.

Python turns Ctrl-C into ``KeyboardInterrupt`` but lets SIGTERM (what ``kill``, schedulers and
containers send) kill the process on the spot, leaving the lock and a half-written work folder.
During a run SIGTERM raises `Terminated` instead, so both unwind through the same cleanup: the
work folder keeps its finished layers (each written atomically), the lock is released, and the
output is untouched. The publishing swap itself runs with both signals held back
(`deferred_interrupts`), so an interrupt never lands between removing the old output and
renaming the new one into place.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError, Interrupted, QuantkitError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_DISK_FULL = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is exhausted",
              errno.EFBIG: "the file-size limit (ulimit -f) was reached"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises ``KeyboardInterrupt``."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` inside the block (signal handlers exist only in the main thread)."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for a short critical block; raise after it if one came."""
    if not _main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise Terminated() if caught[0] == signal.SIGTERM else KeyboardInterrupt()


def signal_of(exc: KeyboardInterrupt) -> int:
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT


def signal_name(exc: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C (SIGINT)"


def as_run_failure(exc: BaseException, work_dir: Path, finished: int, total: int, output_dir: Path,
                   published: bool = False) -> QuantkitError | None:
    """One-line error for an interrupt or a full disk during a run, saying what is left for
    ``--resume``; None for any other failure. ``published``: the interrupt came while the
    output was being swapped into place, which was let finish."""
    if published and isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"interrupted by {signal_name(exc)} while publishing; {output_dir} is complete",
                           signal=signal_of(exc))
    if finished:
        kept = f"{finished} of {total} layers are finished and kept in {work_dir}"
        again = "run again with --resume to continue"
    else:
        kept, again = "no layer was finished", "run again"
    untouched = f"{output_dir} is untouched"
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"interrupted by {signal_name(exc)}; {kept}; {untouched}", hint=again,
                           signal=signal_of(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        where = exc.filename or work_dir
        return ExportError(f"{_DISK_FULL[exc.errno]} while writing {where}; {kept}; {untouched}",
                           field="export.output_dir", value=str(output_dir), file=where,
                           hint=f"free space (or raise the limit), then {again}")
    return None
