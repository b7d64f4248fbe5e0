"""What the source weights were when a run started, to refuse resuming over changed weights.

The run's fingerprint covers tensor and shard names; weights rewritten in place keep both, and
``--resume`` replayed the old layers into a checkpoint of mixed weights. Each shard is recorded
by size, modification time and a hash of its header (milliseconds for any model); with
``model.fingerprint: full`` also by a hash of every byte (reads the model once more, but a
copied model with new mtimes still resumes). Checked on resume and again before publishing.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import ModelError

log = logging.getLogger(__name__)

Fingerprint = dict[str, dict[str, Any]]


def fingerprint_weights(model_dir: Path, shards: list[str], full: bool = False, quiet: bool = True) -> Fingerprint:
    """Per shard (as the weight map names it): ``size``, ``mtime_ns``, ``header_sha256`` and, if
    ``full``, ``sha256``."""
    paths = {s: Path(model_dir) / s for s in sorted(set(shards))}
    out: Fingerprint = {}
    total = sum(p.stat().st_size for p in paths.values()) if full else 0
    with tqdm(total=total, desc="hashing weights", unit="B", unit_scale=True, disable=quiet or not full) as bar:
        for shard, path in paths.items():
            st = path.stat()
            entry: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                entry["header_sha256"] = hashlib.sha256(head + f.read(min(n, st.st_size))).hexdigest()
                if full:
                    h = hashlib.sha256()
                    f.seek(0)
                    while chunk := f.read(16 << 20):
                        h.update(chunk)
                        bar.update(len(chunk))
                    entry["sha256"] = h.hexdigest()
            out[shard] = entry
    return out


_WHAT = {"size": "its size", "mtime_ns": "its modification time", "header_sha256": "its header (tensor list)",
         "sha256": "its contents"}


def first_change(recorded: Fingerprint, current: Fingerprint) -> tuple[str, str] | None:
    """``(shard, what changed)`` for the first shard that differs, or None when none does.

    When both sides hold a full hash, contents decide and modification times are ignored.
    """
    for shard in sorted(set(recorded) | set(current)):
        if shard not in current:
            return shard, "is gone"
        if shard not in recorded:
            return shard, "is new"
        was, now = recorded[shard], current[shard]
        keys = [k for k in ("size", "header_sha256", "sha256", "mtime_ns") if k in was and k in now]
        if "sha256" in keys:
            keys.remove("mtime_ns")
        changed = [k for k in keys if was[k] != now[k]]
        if changed:
            return shard, f"differs in {_WHAT[changed[0]]}"
    return None


def check_unchanged(recorded: Fingerprint | None, current: Fingerprint, model_dir: Path, when: str) -> None:
    """Refuse (``ModelError`` naming the shard) when the weights differ from ``recorded``."""
    if recorded is None:
        raise ModelError(f"{when}: the work folder records no fingerprint of the model's weights (written by an "
                         "older quantkit)", field="model.id", hint="run without --resume to start over")
    change = first_change(recorded, current)
    if change:
        path = Path(model_dir) / change[0]
        raise ModelError(f"{when}: the model's weights changed since the run started: {path} {change[1]}",
                         field="model.id", file=path,
                         hint="restore the original weights, or run without --resume to start over")
