"""Many tensors' bytes read from their shard files into a few reused host chunks, then copied
to the device in bulk.

Read one at a time through safetensors, a Qwen3-30B-A3B layer (1,152 expert tensors, 1.2 GB)
took ~0.5 s on an H200 with the shard in the page cache, all of it pageable host-to-device
copies: each tensor is copied out of the mapped file (page faults), then through the driver's
staging buffer, synchronously. Here a few threads ``preadv`` the byte ranges (the kernel copies
from the page cache with the GIL released; adjacent ranges of one file are one read) into a
ring of page-locked chunks, while the calling thread issues asynchronous copies from each
filled chunk into every tensor's own device allocation. A chunk is refilled only after the
event recorded behind its copies: host memory stays a few chunks, whatever the layer's size
(DeepSeek-V3's: 11 GB of FP8 codes).

``plan_reads`` (which bytes go through which chunk) is a pure function; ``read_extents`` runs a
plan, on a CUDA device with page-locked chunks, elsewhere with plain ones.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError

CHUNK_BYTES = 64 << 20
THREADS = 4
RING = THREADS + 1  # chunks: host memory is RING * CHUNK_BYTES (page-locked on a GPU)

@dataclass(frozen=True)
class Extent:
    """One tensor's bytes in its file: ``[begin, end)`` absolute offsets, as the shard header says."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Read:
    """``size`` bytes of ``path`` from ``offset`` into the chunk at ``at``."""

    path: Path
    offset: int
    size: int
    at: int


@dataclass(frozen=True)
class Piece:
    """``size`` bytes of extent ``index`` from its byte ``offset``, found in the chunk at ``at``."""

    index: int
    offset: int
    size: int
    at: int


@dataclass(frozen=True)
class Chunk:
    reads: tuple[Read, ...]
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.reads)


def plan_reads(extents: Sequence[Extent], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """The chunks that carry ``extents``' bytes, in file order, each full but the last: a tensor
    larger than a chunk spans several, a chunk holds many small ones, and the ranges of one
    file that follow each other are one read per chunk."""
    chunks: list[Chunk] = []
    reads: list[Read] = []
    pieces: list[Piece] = []
    at = 0
    for i in sorted(range(len(extents)), key=lambda i: (str(extents[i].path), extents[i].begin)):
        e = extents[i]
        done = 0
        while done < e.size:
            n = min(e.size - done, chunk_bytes - at)
            pieces.append(Piece(i, done, n, at))
            last = reads[-1] if reads else None
            if last is not None and last.path == e.path and last.offset + last.size == e.begin + done:
                reads[-1] = Read(last.path, last.offset, last.size + n, last.at)
            else:
                reads.append(Read(e.path, e.begin + done, n, at))
            done += n
            at += n
            if at == chunk_bytes:
                chunks.append(Chunk(tuple(reads), tuple(pieces)))
                reads, pieces, at = [], [], 0
    if reads:
        chunks.append(Chunk(tuple(reads), tuple(pieces)))
    return chunks


def unreadable_tensor(name: str, path: Path, why: object) -> ModelError:
    """The error for a tensor whose bytes cannot be read (a damaged or truncated shard)."""
    return ModelError(f"model: cannot read tensor '{name}' from {path} ({why})", value=name, file=path,
                      hint="the shard is damaged or truncated; re-download or re-convert the model")


def read_extents(extents: Sequence[Extent], device: torch.device,
                 cast: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Each extent as a tensor on ``device`` (its stored dtype, or ``cast`` for floating-point
    ones, cast on the device), yielded as ``(index in extents, tensor)`` once its last byte's
    copy is issued, in file order: a caller that turns tensors into others (codes and scales
    into float weights) holds only those not yet turned, not the whole layer's.

    A short read (the file shorter than its header says) or an I/O error raises the
    ``ModelError`` of ``unreadable_tensor`` naming the tensor and its file. The reading threads
    are joined before the generator finishes, raises or is closed (Ctrl-C included).
    """
    plan = plan_reads(extents, CHUNK_BYTES)
    out: dict[int, torch.Tensor] = {}
    flat: dict[int, torch.Tensor] = {}
    left = [e.size for e in extents]

    def finish(i: int) -> tuple[int, torch.Tensor]:
        t = out.pop(i) if i in out else torch.empty(extents[i].shape, dtype=extents[i].dtype, device=device)
        flat.pop(i, None)
        return i, t.to(cast) if cast is not None and t.is_floating_point() else t

    for i in (i for i, n in enumerate(left) if n == 0):
        yield finish(i)
    if not plan:
        return
    cuda = device.type == "cuda"
    size = max(c.size for c in plan)
    bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(min(RING, len(plan)))]
    views = [memoryview(b.numpy()) for b in bufs]
    events: list[torch.cuda.Event | None] = [None] * len(bufs)
    fds: dict[Path, int] = {}
    futures: dict[int, Future] = {}
    pool = _Readers(min(THREADS, len(bufs)))
    try:
        pool.start()
        for path in dict.fromkeys(r.path for c in plan for r in c.reads):
            try:
                fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                first = next(extents[p.index].name for c in plan for p in c.pieces if extents[p.index].path == path)
                raise unreadable_tensor(first, path, e.strerror or e) from None

        def submit(k: int) -> None:
            futures[k] = pool.submit(_fill, plan[k], views[k % len(bufs)], fds,
                                     lambda at, why, k=k: _error_at(plan[k], at, why, extents))

        for k in range(len(bufs)):
            submit(k)
        for k, chunk in enumerate(plan):
            slot = k % len(bufs)
            futures.pop(k).result()
            buf = bufs[slot]
            complete = []
            for p in chunk.pieces:
                if p.index not in out:  # allocated at its first piece: the device holds what has arrived
                    e = extents[p.index]
                    out[p.index] = torch.empty(e.shape, dtype=e.dtype, device=device)
                    flat[p.index] = out[p.index].reshape(-1).view(torch.uint8)
                flat[p.index][p.offset:p.offset + p.size].copy_(buf[p.at:p.at + p.size], non_blocking=cuda)
                left[p.index] -= p.size
                if not left[p.index]:
                    complete.append(p.index)
            if cuda:
                events[slot] = torch.cuda.Event()
                events[slot].record(torch.cuda.current_stream(device))
            # The previous chunk's slot is refilled once its copies are done (issued a chunk
            # ago, they are by now): the wait stays on this thread, the one that set the
            # device; the readers never touch CUDA.
            again = k - 1 + len(bufs)
            if k and again < len(plan):
                done = events[(k - 1) % len(bufs)]
                if done is not None:
                    done.synchronize()
                submit(again)
            for i in complete:
                yield finish(i)
    finally:
        pool.close()
        for fd in fds.values():
            os.close(fd)


class _Readers:
    """Threads running jobs in the order given; ``close`` drops the jobs not yet begun and joins
    every thread."""

    def __init__(self, n: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._threads = [threading.Thread(target=self._run, name=f"quantkit-read-{i}") for i in range(n)]

    def start(self) -> None:
        """The threads, started with SIGINT blocked (they inherit the mask): a Ctrl-C cannot land
        inside ``Thread.start`` and leave a running thread unrecorded (it is raised once the
        mask is lifted, every thread started), and the kernel hands it to the calling thread,
        waking it from its wait at once."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for t in self._threads:
                t.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def submit(self, fn: Callable[..., None], *args: object) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        self._stop = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            if t.ident is not None:
                t.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if self._stop:
                future.cancel()
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the thread waiting on the result
                future.set_exception(e)


def _fill(chunk: Chunk, view: memoryview, fds: dict[Path, int], error: Callable[[int, object], ModelError]) -> None:
    """A chunk's reads into ``view``."""
    for r in chunk.reads:
        got = 0
        while got < r.size:
            try:
                n = os.preadv(fds[r.path], [view[r.at + got:r.at + r.size]], r.offset + got)
            except OSError as e:
                raise error(r.at + got, e.strerror or e) from None
            if n == 0:
                raise error(r.at + got, f"short read: the file ends at byte {r.offset + got}, "
                                        f"{r.size - got} bytes before the data its header describes")
            got += n


def _error_at(chunk: Chunk, at: int, why: object, extents: Sequence[Extent]) -> ModelError:
    """The error naming the tensor whose bytes were to land at ``at`` in ``chunk``."""
    p = next(p for p in chunk.pieces if p.at <= at < p.at + p.size)
    return unreadable_tensor(extents[p.index].name, extents[p.index].path, why)
