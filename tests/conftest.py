"""Fixtures: the tiny-model factory (tests/helpers.py), the architectures every stitching test
runs on, and the `slow` marker (the pipeline and real-seed tests: `pytest -m "not slow"`)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

@pytest.fixture(params=["llama-tied", "qwen2-untied"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def make_model():
    """Factory fixture: `make_model(arch, seed, **config_overrides)`."""
    return tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread; more only contend with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: runs the pipeline or a real seed (minutes); `-m 'not slow'` skips it"
    )
