import pytest
import torch


@pytest.fixture()
def gen():
    """A fresh generator per test: every test draws its own random inputs."""
    return torch.Generator().manual_seed(torch.seed() % (2**31))
