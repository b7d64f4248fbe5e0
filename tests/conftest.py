"""Shared fixtures: an isolated quantkit cache and tiny local models (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model, write_text_file


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session temp folder; the converted real model is reused."""
    import os

    if "QUANTKIT_CACHE" not in os.environ:
        monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path_factory.getbasetemp() / "qk-cache"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", layers=2, hidden=256, intermediate=512)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    return write_text_file(tmp_path_factory.mktemp("text") / "text.jsonl")
