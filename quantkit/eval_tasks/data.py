"""Loaders lm-eval calls (``custom_dataset: !function data.NAME``) for the tasks beside this
file: the data sits next to them, so they work offline from any working directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

_HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (_HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**_: Any) -> datasets.DatasetDict:
    return _load("mc.jsonl")


def generation(**_: Any) -> datasets.DatasetDict:
    return _load("gen.jsonl")
