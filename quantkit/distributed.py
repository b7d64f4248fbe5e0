"""The ranks of a run and what they exchange, through torch.distributed.

A run on one device is the world of size 1: every collective below is then the identity and
every unit is owned by rank 0, so the single-device run and the distributed one are the same
code. Under ``torchrun`` each rank calibrates its share of the batches, statistics are reduced
once per stage, each unit is solved by one owner rank chosen by estimated cost, and the
owners' results are broadcast so every rank propagates its share with the same weights.

Tensors travel with a JSON header (names, dtypes, shapes, metadata), never pickle.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError, PeerLostError

log = logging.getLogger(__name__)

T = TypeVar("T")
Tensors = dict[str, torch.Tensor]
# A unit of work: its estimated cost, and what solves it (tensors plus JSON-able metadata).
Job = tuple[float, Callable[[], tuple[Tensors, dict]]]


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run; ``device`` is where its collectives
    run (a rank's own GPU, or the CPU with gloo)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the work folder, exports, pushes and reports."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: items ``rank, rank + size, ...``."""
        return list(items[self.rank::self.size])

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``t`` reduced over the ranks in place (``"sum"``, ``"max"`` or ``"min"``); returns ``t``."""
        if self.size > 1:
            _guard(lambda: dist.all_reduce(t, op=_OPS[op]))
        return t

    def reduce_to(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        """``t`` summed over the ranks into rank ``dst``'s ``t`` (the others' are left undefined)."""
        if self.size > 1:
            _guard(lambda: dist.reduce(t, dst, op=dist.ReduceOp.SUM))
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``[n_r, ...]`` rows concatenated in rank order (``n_r`` may differ)."""
        if self.size == 1:
            return t
        counts = torch.tensor([t.shape[0]], device=self.device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.size)]
        _guard(lambda: dist.all_gather(all_counts, counts))
        n = [int(c) for c in all_counts]
        padded = t.new_zeros((max(n), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        _guard(lambda: dist.all_gather(parts, padded.contiguous()))
        return torch.cat([p[:k] for p, k in zip(parts, n)])

    def broadcast(self, tensors: Tensors | None, src: int, metadata: dict | None = None) -> tuple[Tensors, dict]:
        """Rank ``src``'s ``tensors`` and JSON-able ``metadata`` on every rank (others pass None)."""
        if self.size == 1:
            return dict(tensors or {}), dict(metadata or {})
        if self.rank == src:
            header = {"metadata": metadata or {},
                      "tensors": [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()]}
            raw = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(self.device)
            length = torch.tensor([raw.numel()], device=self.device)
        else:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
        _guard(lambda: dist.broadcast(length, src))
        if self.rank != src:
            raw = torch.empty(int(length), dtype=torch.uint8, device=self.device)
        _guard(lambda: dist.broadcast(raw, src))
        header = json.loads(bytes(raw.cpu().numpy()).decode())
        out: Tensors = {}
        for name, dtype, shape in header["tensors"]:
            # As bytes: every backend moves uint8, not every one float8 or bool.
            if self.rank == src:
                t = tensors[name].detach().to(self.device).contiguous()
                raw = t.reshape(-1).view(torch.uint8)
            else:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                raw = t.reshape(-1).view(torch.uint8)
            _guard(lambda: dist.broadcast(raw, src))
            out[name] = t
        return out, header["metadata"]

    def owners(self, costs: Mapping[str, float], pinned: Mapping[str, int] | None = None) -> dict[str, int]:
        """An owner rank per unit: ``pinned`` units keep theirs (a MoE expert's solve runs where
        its statistics are), the others go largest estimated cost first to the least loaded
        rank (ties by key and rank, so every rank computes the same assignment)."""
        pinned = {k: r for k, r in (pinned or {}).items() if k in costs}
        load = [0.0] * self.size
        out = dict(pinned)
        for key, r in pinned.items():
            load[r] += costs[key]
        for key in sorted(set(costs) - set(pinned), key=lambda k: (-costs[k], k)):
            r = min(range(self.size), key=lambda i: (load[i], i))
            out[key] = r
            load[r] += costs[key]
        return out

    def solve(self, jobs: Mapping[str, Job],
              pinned: Mapping[str, int] | None = None) -> dict[str, tuple[Tensors, dict]]:
        """Run each job ``key -> (estimated cost, fn)`` on its owner rank (``owners``) and give
        every rank every job's result (``fn`` returns tensors and JSON-able metadata)."""
        owner = self.owners({k: c for k, (c, _) in jobs.items()}, pinned)
        mine = {k: jobs[k][1]() for k in jobs if owner[k] == self.rank}
        if self.size == 1:
            return mine
        results = {}
        for k in jobs:  # every rank built ``jobs`` in the same order: the broadcasts pair up
            tensors, meta = mine.get(k, (None, None))
            results[k] = self.broadcast(tensors, owner[k], meta)
        return results

    def barrier(self) -> None:
        if self.size > 1:
            _guard(dist.barrier)


SINGLE = World()
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _guard(fn: Callable[[], object]) -> None:
    """A collective; a peer that died turns into one DistributedError instead of a backend trace."""
    try:
        fn()
    except (RuntimeError, dist.DistBackendError) as e:
        raise PeerLostError(
            f"lost contact with another rank ({str(e).splitlines()[0][:160]})",
            hint="another rank failed or was killed; its own message says why. Finished layers are kept: "
                 "run again with --resume") from None


def world_from_environment(device: torch.device) -> World:
    """The world torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``), its process group started; without torchrun, the world of one.

    On CUDA each rank takes GPU ``LOCAL_RANK`` and NCCL; on the CPU gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank} wants GPU {local} but {torch.cuda.device_count()} are visible",
                                   field="--gpus", value=size, hint="ask for at most as many ranks as GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=30), **kwargs)
    log.info("rank %d of %d on %s", rank, size, device)
    return World(rank, size, device)


def close() -> None:
    """End the process group a run started (at exit of a rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
