"""Shared fixtures: every test gets its own kappatune cache directory and no hub access."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def _freeze_long_lived_objects():
    """Before each test, move every object then alive (torch, transformers and the model code they import lazily
    on first use: hundreds of thousands of objects) out of the cyclic garbage collector's reach.

    accelerate's ``free_memory`` runs a full ``gc.collect()`` after every training stage, and Python runs its own
    full collections as objects pile up; each one walked the whole heap of the pytest process (~1 s here; about
    a third of the suite's time). Garbage is collected before the freeze, so only live objects are frozen;
    reference counting still frees them, only cycles among them wait for the process to end."""
    gc.collect()
    gc.freeze()
    yield


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
