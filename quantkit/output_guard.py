"""Which folders a run may write, and which existing output it may replace.

``export.overwrite: true`` once deleted the model itself when ``output_dir`` was the model
folder (or a folder containing it) and reported success. A run now replaces only a folder that
a previous quantkit run published (it carries `MARKER`), and never one that is, contains or lies
inside one of the run's inputs (the model folder, calibration and evaluation files) or a
quantkit work folder. Paths are compared after ``~`` expansion and symlink resolution.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

from . import __version__
from .errors import ExportError

log = logging.getLogger(__name__)

MARKER = ".quantkit-output.json"
WORK_SUFFIXES = (".quantkit-partial", ".quantkit-old")
FIELD = "export.output_dir"


def real_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded and symlinks resolved (it need not exist)."""
    return Path(path).expanduser().resolve()


def marker_text() -> str:
    """What `MARKER` holds: who wrote the folder (no time, so two identical runs write identical folders)."""
    return json.dumps({"written_by": "quantkit", "version": __version__}) + "\n"


def old_dir_for(output_dir: Path) -> Path:
    """Where publishing parks the previous output for the instant of the swap."""
    output_dir = Path(output_dir).expanduser()
    return output_dir.parent / f".{output_dir.name}.quantkit-old"


def recover_interrupted_publish(output_dir: Path) -> None:
    """A publish killed between its two renames leaves the previous output parked and no output:
    put it back, so nothing treats it as leftover."""
    out, old = Path(output_dir).expanduser(), old_dir_for(output_dir)
    if old.is_dir() and not out.exists() and not out.is_symlink():
        log.warning("restoring %s from %s, left by a publish that was interrupted", out, old)
        try:
            os.replace(old, out)
        except FileNotFoundError:  # another run restored it first
            pass


def check_output_dir(output_dir: Path, work_dir: Path, inputs: Mapping[str, Path], overwrite: bool) -> None:
    """Refuse an output folder the run must not write, before anything is read or written, and
    finish a publish an earlier run was killed in."""
    check_output_placement(output_dir, work_dir, inputs)
    recover_interrupted_publish(output_dir)
    check_replaceable(output_dir, overwrite)


def check_output_placement(output_dir: Path, work_dir: Path, inputs: Mapping[str, Path]) -> None:
    """``inputs`` maps a recipe field (``model.id``, ``calibration.source`` ...) to a file or folder
    the run reads: neither the output nor the work folder may be, contain or lie inside one."""
    out = real_path(output_dir)
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"{FIELD} {output_dir}: {parent} is a file, not a folder", field=FIELD,
                              value=str(output_dir), hint="choose an output folder outside it")
        if parent.name.endswith(WORK_SUFFIXES):
            raise ExportError(f"{FIELD} {output_dir} lies inside quantkit's work folder {parent}", field=FIELD,
                              value=str(output_dir), hint="choose an output folder outside it")
    work = real_path(work_dir)
    for what, target in ((f"{FIELD} {output_dir}", out), (f"{FIELD} {output_dir}: its work folder {work}", work)):
        for field, path in inputs.items():
            reason = _overlap(target, real_path(path))
            if reason:
                raise ExportError(f"{what} {reason} {field} {path}", field=FIELD, value=str(output_dir), file=path,
                                  hint="choose an output folder apart from the run's inputs")


def _overlap(target: Path, path: Path) -> str | None:
    if target == path:
        return "is the same as"
    if target in path.parents:
        return "contains"
    if path in target.parents:
        return "lies inside"
    return None


def check_replaceable(output_dir: Path, overwrite: bool) -> None:
    """An existing ``output_dir`` may be replaced only with ``overwrite`` and only when quantkit
    wrote it (it holds `MARKER`); checked again right before publishing."""
    out = Path(output_dir).expanduser()
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ExportError(f"{FIELD} {output_dir} exists and is not a folder", field=FIELD, value=str(output_dir),
                          hint="choose a folder path that does not exist")
    if not overwrite:
        raise ExportError(f"{FIELD} {output_dir} exists", field=FIELD, value=str(output_dir),
                          hint="choose another folder or set export.overwrite: true")
    if not (out / MARKER).is_file():
        raise ExportError(f"{FIELD} {output_dir} exists and is not a quantkit output (it has no {MARKER}); "
                          "export.overwrite replaces only folders quantkit wrote", field=FIELD,
                          value=str(output_dir), hint="delete it yourself or choose another folder")


def run_inputs(model_dir: Path, shard_files: list[Path], sources: Mapping[str, str]) -> dict[str, Path]:
    """The files and folders a run reads, by recipe field: the model folder, the real folders of
    its shards (a hub snapshot's files are links into a blob store), and local text sources."""
    inputs: dict[str, Path] = {"model.id": Path(model_dir)}
    folders = sorted({real_path(f).parent for f in shard_files} - {real_path(model_dir)})
    for i, folder in enumerate(folders):
        inputs[f"model.id's weights{f' ({i + 1})' if i else ''} in"] = folder
    for field, source in sources.items():
        path = Path(source).expanduser()
        if path.exists():
            inputs[field] = path
    return inputs
