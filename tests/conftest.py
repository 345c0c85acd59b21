"""Shared fixtures: every test gets its own kappatune cache directory and no hub access."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAPPATUNE_CACHE", str(tmp_path_factory.mktemp("kappatune-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread (here and in subprocesses): tiny ops with 2 threads on a shared 2-core CPU are ~100x slower."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
