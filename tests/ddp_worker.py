"""Helpers shared by test_train.py, and the DDP worker it launches with torch.distributed.run.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT
Each rank trains the same tiny model on the same global batches and writes to
OUT/rank<r>.safetensors its final trainable weights and the input rows it was given, and to
OUT/rank<r>.txt the error that a batch of 3 rows (not divisible by 2 ranks) raises.
"""

import os
import sys
from pathlib import Path

import safetensors.torch
import torch
from helpers import tiny_model
from transformers import LlamaForCausalLM

from bts.errors import BtsError
from bts.train import TrainConfig, train

VOCAB = 64
DDP_CFG = TrainConfig(steps=3, lr=1e-2, grad_accum=2, warmup_steps=1, log_every=1)


def tiny_llama(seed: int = 0, hidden: int = 32, dropout: float = 0.0) -> LlamaForCausalLM:
    """A random 2-layer Llama small enough for many CPU training runs."""
    return tiny_model(
        "llama-untied", seed, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, max_position_embeddings=64, attention_dropout=dropout,
    ).train()  # fmt: skip


def batches(rows: int = 4, seq_len: int = 16, high: int = VOCAB):
    """batch_fn: global micro-batch i is a function of i only."""

    def batch_fn(i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + i)
        return torch.randint(0, high, (rows, seq_len), generator=gen)

    return batch_fn


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    model = tiny_llama()
    seen = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    train(model, batches(), DDP_CFG, out / "run", name="ddp")
    tensors = {**trainable(model), "seen": torch.stack(seen)}
    safetensors.torch.save_file(tensors, str(out / f"rank{rank}.safetensors"))
    try:
        train(tiny_llama(), batches(rows=3), DDP_CFG, out / "odd", name="odd")
    except BtsError as err:
        (out / f"rank{rank}.txt").write_text(str(err))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
