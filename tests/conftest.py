"""Tiny randomly initialised constituents of several Llama-layout architectures."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

ARCHITECTURES = {
    "llama-tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "qwen2-untied": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False}),
    "mistral": (MistralConfig, MistralForCausalLM, {"tie_word_embeddings": False}),
}


def tiny_model(arch: str = "llama-tied", seed: int = 0, **overrides):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).eval()


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
