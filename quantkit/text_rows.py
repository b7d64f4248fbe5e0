"""Calibration and evaluation text checked row by row, so a bad row is named, not a traceback.

``datasets`` reports a non-UTF-8 byte or a broken JSON line as an error about generating a
dataset (or a pyarrow traceback), and a chat row of the wrong shape fails deep in the chat
template. Local files are read once here first; every row is one line of a ``.jsonl`` or
``.txt`` file, and the error names the file and the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CalibrationError


def check_local_text(path: Path, section: str, builder: str) -> None:
    """Refuse a local text file (``builder``: json, text or csv) with a row that is not UTF-8 or,
    for JSON lines, not a JSON object."""
    data = Path(path).read_bytes()
    where = f"{section}.source {path}"
    for row, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationError(f"{where}: row {row} is not UTF-8 text (byte {e.start + 1} of the row is "
                                   f"0x{line[e.start]:02x})", field=f"{section}.source", value=str(path),
                                   file=path, hint="save the file as UTF-8") from None
    if builder != "json" or (path.suffix.lower() == ".json" and _whole_json(data)):
        return
    for row, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: row {row} is not valid JSON ({e.msg}, column {e.colno})",
                                   field=f"{section}.source", value=str(path), file=path,
                                   hint="write one JSON object per line") from None
        if not isinstance(record, dict):
            raise CalibrationError(f"{where}: row {row} is a JSON {type(record).__name__}, not an object",
                                   field=f"{section}.source", value=str(path), file=path,
                                   hint='write one JSON object per line, e.g. {"text": "..."}')


def _whole_json(data: bytes) -> bool:
    """A ``.json`` file may hold one JSON document instead of JSON lines."""
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def check_chat_rows(rows: list[Any], where: str, column: str) -> None:
    """Each row must be a list of ``{"role": str, "content": str}`` messages."""
    for i, messages in enumerate(rows, start=1):
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            got = repr(messages)
            raise CalibrationError(
                f"{where}: row {i}: '{column}' is not a list of messages with a string 'role' and 'content' "
                f"(got {got if len(got) <= 60 else got[:57] + '...'})", field=column, file=where,
                hint='write e.g. [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
