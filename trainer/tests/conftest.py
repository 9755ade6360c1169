import pytest
import torch


@pytest.fixture(autouse=True)
def small_deterministic_torch():
    """Two threads (the machine is shared) and a fixed seed for every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
