"""One run at a time per output folder (and its work folder).

Two runs into one ``output_dir`` used to share the work folder: the second deleted the first's
layers and the first published a checkpoint mixing two recipes. A run now holds a lock file
beside the output, created with ``O_EXCL`` and holding who runs (pid, host, start time, recipe).
The holder also keeps an ``flock`` on it, which the kernel drops when the process dies however
it dies: a lock whose ``flock`` can be taken is stale (its run was killed) and is taken over,
with a log line naming the dead run. The pid is checked as well, for file systems where
``flock`` is only local.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from .errors import ExportError
from .output_guard import real_path

log = logging.getLogger(__name__)


def lock_path_for(output_dir: Path) -> Path:
    """The lock file beside the (resolved) output folder, so ``out``, ``./out`` and a link agree."""
    out = real_path(output_dir)
    return out.parent / f".{out.name}.quantkit-lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a reused pid from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: dict) -> bool:
    """Whether the lock's owner still runs on this host (False when it cannot be told)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded, now = owner.get("process_start"), _process_start(pid)
    return recorded is None or now is None or recorded == now


def describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}, "
            f"recipe {owner.get('recipe') or '?'}")


class RunLock:
    """``with RunLock(output_dir, recipe):`` holds the output folder's lock for the block."""

    def __init__(self, output_dir: Path, recipe: str | None = None):
        self.output_dir = Path(output_dir)
        self.path = lock_path_for(output_dir)
        self.recipe = recipe
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise `ExportError` naming the run that holds it."""
        try:
            self._acquire()
        except OSError as e:
            raise ExportError(f"export.output_dir {self.output_dir}: cannot create the lock file {self.path} "
                              f"({e.strerror or e})", field="export.output_dir", value=str(self.output_dir),
                              file=self.path, hint="choose a folder you can write to") from None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            created = True
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # released between the two opens
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _read(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise self._busy(owner) from None
            if not _same_file(fd, self.path):  # unlinked by its releasing owner after we opened it
                os.close(fd)
                continue
            if not created:
                owner = _read(fd)
                if _alive(owner):
                    os.close(fd)
                    raise self._busy(owner)
                log.warning("taking over the stale lock %s of a run that is gone (%s)", self.path, describe(owner))
            self._write(fd)
            self._fd = fd
            return

    def _busy(self, owner: dict) -> ExportError:
        who = describe(owner) if owner else "a run that is just starting"
        return ExportError(f"export.output_dir {self.output_dir} is in use by another quantkit run ({who})",
                           field="export.output_dir", value=str(self.output_dir), file=self.path,
                           hint="wait for it to finish or choose another output folder")

    def _write(self, fd: int) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "recipe": self.recipe, "output_dir": str(self.output_dir),
                 "process_start": _process_start(os.getpid())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file, then drop the ``flock`` (so no one takes over a file being removed)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        finally:
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
