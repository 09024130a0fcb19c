"""Stitch-training memory and time: frozen constituents in fp32 or bf16 (`stitch.constituent_dtype`),
their activations kept or recomputed (`stitch.checkpoint_frozen`), side by side.

    python benchmarks/train_memory.py [--width 256] [--layers 8] [--experts 3] [--batch 4]
                                      [--seq 256] [--steps 3] [--rounds 2]

A stitched model of 1 + `experts` randomly initialised Llama models (vocab 8192) trains its
stitch parameters with AdamW. Each variant runs in its own process, so that its peak resident
memory (sampled from /proc) is its own; the variants take turns over `rounds`, and the table
shows the median step time and the largest peak growth over the process's memory once the model
is built (weights included in the baseline; the growth is activations, gradients and the
optimiser state), each with its ratio to fp32 with kept activations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from inference import peak_rss_growth
from transformers import LlamaConfig, LlamaForCausalLM

from bts import StitchedModel

VARIANTS = {
    "fp32, kept": (torch.float32, False),
    "fp32, recomputed": (torch.float32, True),
    "bf16, kept": (torch.bfloat16, False),
    "bf16, recomputed": (torch.bfloat16, True),
}


def build(args, dtype: torch.dtype) -> StitchedModel:
    def model(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=8192, hidden_size=args.width, intermediate_size=8 * args.width // 3,
            num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
            num_key_value_heads=max(1, args.width // 128), tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config).to(dtype).eval()

    experts = {f"e{i}": model(i + 1) for i in range(args.experts)}
    stitched = StitchedModel.from_models(model(0), experts, num_stitches=4)
    stitched.train_only()
    return stitched


def one(args, name: str) -> dict:
    """Train `args.steps` steps of one variant; its median step time and peak growth."""
    torch.set_num_threads(2)
    dtype, recompute = VARIANTS[name]
    model = build(args, dtype).set_inference(checkpoint_frozen=recompute).train()
    optimiser = torch.optim.AdamW(model.stitch_parameters(), lr=1e-3)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step():
        optimiser.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimiser.step()

    step()  # warm-up: optimiser state exists from here on, as in training
    times, peak = [], 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        _, grown = peak_rss_growth(step)
        times.append(time.perf_counter() - start)
        peak = max(peak, grown)
    return {"seconds": statistics.median(times), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("width", 256), ("layers", 8), ("experts", 3), ("batch", 4),
                          ("seq", 256), ("steps", 3), ("rounds", 2)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one)))
        return
    flags = [f"--{k}={getattr(args, k)}" for k in ("width", "layers", "experts", "batch", "seq", "steps")]
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            out = subprocess.run(
                [sys.executable, str(Path(__file__)), *flags, "--one", name],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    tokens = args.batch * args.seq
    print(f"stitch training, 1 + {args.experts} Llama models d={args.width} x {args.layers} layers, "
          f"{args.batch} x {args.seq} tokens per step, median of {args.rounds} x {args.steps} steps")
    base = None
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_mb"] for r in runs)
        base = base or (seconds, peak)
        print(f"  {name:18s} {tokens / seconds:8.1f} tokens/s  time x{seconds / base[0]:.2f}   "
              f"peak growth {peak:8.1f} MB  x{peak / base[1]:.2f}")


if __name__ == "__main__":
    main()
