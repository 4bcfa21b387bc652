"""Shared test set-up: the offline environment (no hub, no wandb upload) before anything imports transformers."""

from __future__ import annotations

from vlsi_ray.env import set_offline_defaults

set_offline_defaults()


import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_config import make_tiny_overrides  # noqa: E402

@pytest.fixture(scope="session")
def tiny_overrides():
    """:func:`make_tiny_overrides`, as a fixture."""
    return make_tiny_overrides


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is far faster than two when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
