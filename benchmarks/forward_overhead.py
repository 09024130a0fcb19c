"""Cost of one stitched forward relative to running its constituents separately.

Prints, measured side by side in one run (interleaved, median of repeats), the time of one
stitched forward over hub + N experts divided by the sum of the N+1 constituents' own forwards.

    .venv/bin/python benchmarks/forward_overhead.py [--experts 3 --batch 8 --seq 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bts import StitchedModel


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--stitches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    models = [LlamaForCausalLM(config).eval() for _ in range(args.experts + 1)]
    stitched = StitchedModel.from_models(
        models[0], {f"e{i}": m for i, m in enumerate(models[1:])}, num_stitches=args.stitches
    ).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    separate, joint = [], []
    with torch.inference_mode():
        for m in models:  # warm-up
            m(ids)
        stitched(ids)
        for _ in range(args.repeats):
            separate.append(sum(timed(lambda m=m: m(ids)) for m in models))
            joint.append(timed(lambda: stitched(ids)))
    sep, jnt = statistics.median(separate), statistics.median(joint)
    print(
        f"model d={args.hidden} L={args.layers} V={args.vocab}; hub + {args.experts} experts; "
        f"batch {args.batch} x {args.seq}; {args.stitches} stitch layers; threads "
        f"{torch.get_num_threads()}"
    )
    print(f"sum of {len(models)} separate forwards: {sep * 1e3:8.1f} ms (median of {args.repeats})")
    print(f"one stitched forward:            {jnt * 1e3:8.1f} ms")
    print(f"ratio stitched / separate:       {jnt / sep:8.3f}")


if __name__ == "__main__":
    main()
