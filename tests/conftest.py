"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Tests run two at a time (pytest -n 2) on small tensors: one intra-op thread each avoids
    oversubscribing the cores, which slows tiny convolutions down many times over."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
