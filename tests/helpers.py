"""What several test modules share: the one tiny-model factory, tiny stitched models, batches
and the assertions that compare them. Test modules import from here, never from each other."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from bts import StitchedModel

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
    "llama-untied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
    "qwen2-untied": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False}),
    "mistral": (MistralConfig, MistralForCausalLM, {"tie_word_embeddings": False}),
}


def tiny_model(arch: str = "llama-tied", seed: int = 0, **overrides):
    """A randomly initialised causal LM of `arch` in TINY's shape (overrides win), in eval mode;
    the same seed gives the same weights."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).eval()


def stitched(make_model, arch, n_experts=2, **options) -> StitchedModel:
    """A hub (seed 0) and `n_experts` experts e0, e1, ... (seeds 1, 2, ...) of one `arch`."""
    hub = make_model(arch, seed=0)
    experts = {f"e{i}": make_model(arch, seed=i + 1) for i in range(n_experts)}
    return StitchedModel.from_models(hub, experts, **options)


def randomise_stitches(model: StitchedModel, seed: int = 0) -> None:
    """Move every stitch parameter away from its initialisation, as training would."""
    gen = torch.Generator().manual_seed(seed)
    width = model.config.hidden_size
    with torch.no_grad():
        for p in model.stitch_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
            if p.dim() == 1 and p.shape[0] == width:
                p.abs_()


def batch(vocab=101, rows=3, length=12, seed=0):
    """Token ids and a mask with left padding on the first two rows, as for batched prompts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids, mask


def same(actual, expected):
    """Equal up to float summation order (a zero term or a wider gate matmul reorders sums)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def close(actual, expected):
    """Equal up to the rounding of another computation order (batched against looped)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def sharp(make_model):
    """Constituents with larger weights than the default init: their attention is far from
    uniform, so a wrong position, mask or cache entry changes the logits visibly."""
    return lambda arch, seed=0, **kw: make_model(
        arch, seed=seed, **{"initializer_range": 0.2, **kw}
    )


def trained(make_model, arch, n_experts=3, **options) -> StitchedModel:
    """A stitched model of sharp constituents with stitch parameters moved as by training."""
    model = stitched(sharp(make_model), arch, n_experts=n_experts, **options)
    randomise_stitches(model, seed=1)
    return model.eval()


def looped_and_batched(model, fn):
    """fn(model) with the loop, then with the batched path (checked to be the one that ran)."""
    model.inference.batched = False
    reference = fn(model)
    model.inference.batched = True
    assert model.batched_reason is None
    return reference, fn(model)


TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Question: What is 3 + 4?\nAnswer: 7\n",
    "Question: Solve for x: 2*x + 1 = 5.\nAnswer: 2\n",
    "The quick brown fox jumps over the lazy dog.\n",
]


def build_stitched(root: Path) -> Path:
    """A tiny hub + 2 experts with a trained tokenizer, saved, stitched with non-trivial stitch
    weights and saved under root/stitched (for export, lm-eval and I/O tests)."""
    from bts.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TEXTS * 4, 300, root / "tokenizer")
    eos = tokenizer.eos_token_id
    for seed, name in enumerate(["hub", "code", "math"]):
        model = tiny_model(
            "llama-tied", seed, vocab_size=len(tokenizer), max_position_embeddings=256,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    hub = AutoModelForCausalLM.from_pretrained(root / "hub")
    experts = {n: AutoModelForCausalLM.from_pretrained(root / n) for n in ("code", "math")}
    model = StitchedModel.from_models(hub, experts, num_stitches=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: gates open, projections away from identity
        for p in model.stitch_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(root / "stitched")
    return root / "stitched"
