"""Shared fixtures: every test gets its own kappatune cache directory and no hub access."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAPPATUNE_CACHE", str(tmp_path_factory.mktemp("kappatune-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
