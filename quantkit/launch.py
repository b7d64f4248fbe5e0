"""``quantkit run --gpus N``: the same command on N ranks, started by torchrun's own launcher.

The launcher (torch.distributed's elastic agent, what ``torchrun --standalone`` runs) starts
``python -m quantkit run ...`` once per rank with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set,
watches them, and stops the others when one fails. Ranks that fail only because a peer
vanished stay quiet (``QUANTKIT_LAUNCHED``): the launcher names the rank that failed first,
so a killed run ends with one error line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from .errors import DistributedError

# Set for the ranks this launcher starts: it reports a lost rank itself.
LAUNCHED_ENV = "QUANTKIT_LAUNCHED"
# How such a rank exits when it stopped only because another rank was gone.
PEER_LOST_EXIT = 75
# How a rank exits after printing its own one-line error (the CLI's code for a QuantkitError).
REPORTED_EXIT = 2


def run_ranks(nproc: int, args: list[str], work_hint: str) -> int:
    """Run ``python -m quantkit <args>`` on ``nproc`` ranks of this host. Returns 0, or the exit
    code of a rank that failed with its own one-line error (already printed); a rank that died
    otherwise (a signal, a crash) is one DistributedError naming it and how."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    # The ranks inherit this environment. Each computes with its share of the host's threads;
    # without a limit torch would oversubscribe it.
    added = {LAUNCHED_ENV: "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or nproc) // nproc))}
    added = {k: v for k, v in added.items() if k not in os.environ}
    os.environ.update(added)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "quantkit", *args)
        return 0
    except ChildFailedError as e:
        # The cause first: not a rank that stopped because a peer was gone, nor one the agent
        # stopped (SIGTERM, which the CLI turns into exit code 128 + 15).
        rank, failure = min(e.failures.items(), key=lambda kv: (
            kv[1].exitcode == PEER_LOST_EXIT, kv[1].exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM),
            kv[1].timestamp, kv[0]))
        if failure.exitcode == REPORTED_EXIT:
            return REPORTED_EXIT
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise DistributedError(f"rank {rank} of {nproc} failed ({how}); the run stopped and wrote no output",
                               field="--gpus", value=nproc,
                               hint=f"finished layers are kept in {work_hint}: run again with --resume") from None
    finally:
        for k in added:
            os.environ.pop(k, None)
