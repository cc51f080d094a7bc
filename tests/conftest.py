"""Shared test set-up: SD trainer tests run offline and single-threaded (this machine's 2 cores are shared, and
torch's thread pool under contention is 10x slower than one thread)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _offline_single_thread(request, monkeypatch):
    if not request.module.__name__.startswith(("test_sd_", "test_export", "test_families")):
        yield
        return
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
