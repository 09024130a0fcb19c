"""A mixed set of experts (another width and depth than the hub's) batched against looped.

Prints, measured side by side in one run (interleaved, median of repeats), one stitched forward
of hub + a same-shape expert + a wider, deeper expert + a narrower, shallower one with
`inference.batched` on and off, and the ratio; then the same for hub + three same-shape experts,
where the batched path does stack. A mixed set falls back to the loop (`batched_reason` says
why), so its ratio should be 1 up to noise: never slower than the loop.

    .venv/bin/python benchmarks/mixed_experts.py [--batch 8 --seq 256 --hidden 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bts import StitchedModel


def model(cls, config_cls, args, hidden: int, layers: int, seed: int):
    config = config_cls(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=args.seq,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return cls(config).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def batched_and_looped(stitched: StitchedModel, ids: torch.Tensor, repeats: int):
    """Median seconds of one forward with the batched path on, then off (interleaved)."""
    times = {True: [], False: []}
    with torch.inference_mode():
        for batched in (True, False):  # warm-up (and the stacks' first build)
            stitched.set_inference(batched=batched)(ids)
        for _ in range(repeats):
            for batched in (True, False):
                stitched.set_inference(batched=batched)
                times[batched].append(timed(lambda: stitched(ids)))
    stitched.set_inference(batched=True)
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--stitches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    d, layers = args.hidden, args.layers
    hub = model(LlamaForCausalLM, LlamaConfig, args, d, layers, 0)
    same = model(LlamaForCausalLM, LlamaConfig, args, d, layers, 1)
    wide = model(Qwen2ForCausalLM, Qwen2Config, args, d * 3 // 2, layers * 3 // 2, 2)
    narrow = model(LlamaForCausalLM, LlamaConfig, args, d * 3 // 4, layers * 2 // 3, 3)
    sets = {
        "mixed": {"same": same, "wide": wide, "narrow": narrow},
        "same-shape": {f"e{i}": model(LlamaForCausalLM, LlamaConfig, args, d, layers, 4 + i)
                       for i in range(3)},
    }
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    print(
        f"hub Llama d={d} L={layers} V={args.vocab}; mixed: Llama d={d} L={layers}, Qwen2 "
        f"d={d * 3 // 2} L={layers * 3 // 2}, Llama d={d * 3 // 4} L={layers * 2 // 3}; batch "
        f"{args.batch} x {args.seq}; {args.stitches} stitch layers; threads "
        f"{torch.get_num_threads()}"
    )
    for label, experts in sets.items():
        stitched = StitchedModel.from_models(hub, experts, num_stitches=args.stitches).eval()
        batched, looped = batched_and_looped(stitched, ids, args.repeats)
        print(
            f"{label:>10}: batched {batched * 1e3:8.1f} ms, looped {looped * 1e3:8.1f} ms "
            f"(median of {args.repeats}); ratio batched / looped {batched / looped:6.3f}; "
            f"batched_reason: {stitched.batched_reason}"
        )


if __name__ == "__main__":
    main()
