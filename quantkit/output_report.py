"""report.json and the model card of a finished output folder, updated after the fact.

``quantkit eval --tasks`` measures a checkpoint that ``run`` already wrote; its numbers belong
beside the others, in the same report.json and the same card, not in a file users miss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .card import base_license, render_card
from .errors import ExportError


def read_report(output_dir: Path) -> dict[str, Any] | None:
    path = Path(output_dir) / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def add_section(output_dir: Path, key: str, section: dict[str, Any]) -> dict[str, Any]:
    """Put ``section`` under ``key`` in report.json and render the card again from it; the
    card keeps the license its front matter already has."""
    output_dir = Path(output_dir)
    report = read_report(output_dir)
    if report is None:
        raise ExportError(f"{output_dir} has no report.json; it is not a folder written by `quantkit run`",
                          file=output_dir / "report.json", hint="give the output folder of `quantkit run`")
    report[key] = section
    card = render_card(report, base_license(output_dir))
    for name, text in (("report.json", json.dumps(report, indent=2)), ("README.md", card)):
        tmp = output_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output_dir / name)
    return report
