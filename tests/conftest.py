"""Fixtures every test folder may use."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: faster, and far faster when other processes
    load the CPU (two threads made 0.1 s runs take seconds on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
