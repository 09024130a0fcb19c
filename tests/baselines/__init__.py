"""Shared builders for baseline tests: a tiny seed and experts branched from it, saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=2048,  # Llama's default
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with fewer than 128 tokens, so it fits TINY_LLAMA's vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100],
        show_progress=False,
    )
    tokenizer.train_from_iterator(["the seed branches into experts"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def tiny_seed(**overrides) -> LlamaForCausalLM:
    return tiny_model("llama-tied", 0, **{**TINY_LLAMA, **overrides})


def branch(seed: LlamaForCausalLM, noise_seed: int, scale: float = 0.05) -> LlamaForCausalLM:
    """A copy of the seed with seeded Gaussian noise on every weight (scale 0 gives an exact copy)."""
    expert = LlamaForCausalLM(seed.config).eval()
    expert.load_state_dict(seed.state_dict())
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for param in expert.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return expert


def save(model: LlamaForCausalLM, path: Path) -> Path:
    """save_pretrained the model with the tiny tokenizer beside it."""
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_family(root: Path, names: tuple[str, ...] = ("code", "math"), scale: float = 0.05):
    """Save a seed and experts branched from it; returns (seed_dir, {name: expert_dir})."""
    seed = tiny_seed()
    seed_dir = save(seed, root / "seed")
    experts = {name: save(branch(seed, i + 1, scale), root / name) for i, name in enumerate(names)}
    return seed_dir, experts
