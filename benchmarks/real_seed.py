"""Speed of the real seed (SmolLM2-135M-Instruct) and of stitched models over it, on this machine.

Prints tokens/s for: a forward pass (batch x seq) of the seed and of hub + N copies stitched;
stitch training steps (forward + backward + AdamW on stitch parameters only, hub + N copies);
greedy generation from the seed, from the stitched model (`StitchedModel.generate`) and from its
Hugging Face wrapper (what `bts export` writes; transformers' `generate`). Then a sample
generation from the seed and from the stitched model. Copies are the seed with a little noise
(a stand-in for continued pretraining), so stitch gradients are not zero; at init the stitched
model computes the seed's logits, so its sample matches the seed's.

    .venv/bin/python benchmarks/real_seed.py [--run runs/smollm2 --experts 3 --batch 8 --seq 256]

The seed is converted once into RUN/seed (`bts seed configs/smollm2.yaml`) and reused.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bts import StitchedModel
from bts.config import load_config
from bts.hf import BtsStitchedForCausalLM
from bts.stages import Run, make_seed

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
]


def median_time(fn, repeats: int, warm_up=None) -> float:
    (warm_up or fn)()  # first-call costs (allocations, stacked weights) are not measured
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copies(seed_dir: Path, n: int) -> dict[str, torch.nn.Module]:
    experts = {}
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(seed_dir)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in model.model.layers:
                w = layer.mlp.down_proj.weight
                w.add_(0.01 * torch.randn(w.shape, generator=generator))
        experts[f"e{i}"] = model
    return experts


def chat(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def new_tokens(out: torch.Tensor, prompt: torch.Tensor, eos: int) -> torch.Tensor:
    tail = out[0, prompt.shape[1] :]
    stop = (tail == eos).nonzero()
    return tail[: int(stop[0]) + 1] if len(stop) else tail


def report(label: str, tokens: int, seconds: float) -> None:
    print(f"{label:<52} {tokens / seconds:10.1f} tokens/s  ({tokens} tokens in {seconds:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "smollm2")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    seed_dir = make_seed(Run.open(load_config(ROOT / "configs" / "smollm2.yaml"), args.run))
    seed = AutoModelForCausalLM.from_pretrained(seed_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    stitched = StitchedModel.from_models(
        seed, copies(seed_dir, args.experts), num_stitches=4
    ).eval()
    print(
        f"SmolLM2-135M seed (L=30, d=576); stitched: hub + {args.experts} copies, 4 stitch layers; "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )

    ids = torch.randint(0, seed.config.vocab_size, (args.batch, args.seq))
    shape = f"{args.batch}x{args.seq}"
    # no_grad, not inference_mode: tensors a model caches here are reused by training below
    with torch.no_grad():
        for label, model in (("seed", seed), ("stitched", stitched)):
            seconds = median_time(
                lambda m=model: m(ids), args.repeats, lambda m=model: m(ids[:1, :16])
            )
            report(f"forward {shape}, {label}", ids.numel(), seconds)

    train_ids = ids[: args.train_batch, : args.train_seq]
    stitched.train_only()
    stitched.train()
    optimizer = torch.optim.AdamW(stitched.stitch_parameters(), lr=1e-3)

    def step():
        loss = stitched(train_ids, labels=train_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_time(step, args.repeats)
    stitched.eval()
    report(f"stitch training step {args.train_batch}x{args.train_seq}", train_ids.numel(), seconds)

    eos = tokenizer.eos_token_id
    prompt = chat(tokenizer, "Tell me a long story about a lighthouse keeper.")
    n = args.new_tokens
    fixed = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    report(
        f"greedy generation, seed (HF generate, {n} new)",
        n,
        median_time(lambda: seed.generate(prompt, **fixed), args.repeats),
    )
    wrapper = BtsStitchedForCausalLM.from_stitched(stitched)
    report(
        f"greedy generation, stitched (HF wrapper, {n} new)",
        n,
        median_time(lambda: wrapper.generate(prompt, **fixed), args.repeats),
    )
    made = []
    seconds = median_time(
        lambda: made.append(stitched.generate(prompt, max_new_tokens=n)), args.repeats
    )
    count = len(new_tokens(made[-1], prompt, eos))
    report("greedy generation, stitched (StitchedModel.generate)", count, seconds)

    for question in QUESTIONS:
        prompt = chat(tokenizer, question)
        for label, model in (("seed", seed), ("stitched", stitched)):
            out = model.generate(prompt, max_new_tokens=n, do_sample=False)
            text = tokenizer.decode(new_tokens(out, prompt, eos), skip_special_tokens=True)
            print(f"\n[{label}] {question}\n{text}")


if __name__ == "__main__":
    main()
