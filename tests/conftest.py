"""Shared test set-up: every test runs offline (no test may reach the hub: a lookup that cannot connect waits ~23 s
for its timeout), SD trainer tests single-threaded (this machine's 2 cores are shared, and torch's thread pool under
contention is 10x slower than one thread)."""

import huggingface_hub.constants
import pytest
import torch


@pytest.fixture(autouse=True)
def _offline_single_thread(request, monkeypatch):
    # the variable for subprocesses; huggingface_hub read it once at import, so its constant for this process
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if not request.module.__name__.startswith(("test_sd_", "test_export", "test_families")):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
