"""Shared fixtures: every test gets its own kappatune cache directory and no hub access."""

from __future__ import annotations

import gc
import os

import pytest

# the kappatune cache pytest was started with (None: the default, ~/.cache/kappatune), before any test isolates it
_USER_CACHE = os.environ.get("KAPPATUNE_CACHE")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest process per core (pytest-xdist): each, and the CLI processes its tests start,
    # uses one torch thread, so the processes do not fight over the cores (tiny ops with more threads than free
    # cores are many times slower). A test that sets its own thread count still does.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture
def shared_cache(monkeypatch):
    """Use the user's own kappatune cache instead of the test's empty one: for slow tests that need the real
    model, corpora or labelled tasks but are not about fetching or building them, so that the ~100 s SmolLM2
    conversion and the source downloads happen once per machine, not in every such test. (test_real_model and
    test_labelled's build test keep covering the fresh-machine path.)"""
    if _USER_CACHE:
        monkeypatch.setenv("KAPPATUNE_CACHE", _USER_CACHE)
    else:
        monkeypatch.delenv("KAPPATUNE_CACHE", raising=False)
