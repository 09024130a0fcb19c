"""How much of each expert's gain survives the hub's output head?

BTS takes logits from the hub's final norm and LM head. A perfect experts-into-hub gate (all
weight on the domain's expert, P = I) therefore computes the hub's head on the expert's final
hidden state. This prints, per expert domain and measured in one run on the same held-out
sequences: the seed's loss, the expert's own loss, and the loss of that "perfect switch".

    .venv/bin/python benchmarks/head_bound.py runs/demo [--max-sequences 32]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bts.models import load_causal_lm
from bts.stages import Run, make_seed, train_expert
from bts.stitch import causal_lm_loss


def final_stream(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's last residual stream before its final norm, what a BTS stitch mixes.
    (transformers 5's `hidden_states[-1]` is after the final norm: normalising it again with the
    hub's norm would apply two norm weights, far from 1 in a real model such as SmolLM2.)"""
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        model.model(ids)
    finally:
        hook.remove()
    return seen[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max-sequences", type=int, default=32)
    args = parser.parse_args()
    run = Run.load(args.run_dir)
    seed = load_causal_lm(make_seed(run)).eval()
    print(f"{'domain':<10}{'seed':>9}{'expert':>9}{'hub head on expert':>20}{'gain kept':>11}")
    for domain in run.config.expert_domains:
        expert = load_causal_lm(train_expert(run, domain)).eval()
        rows = run.corpus[domain].held_out.array[: args.max_sequences]
        ids = torch.from_numpy(np.asarray(rows).astype(np.int64))
        with torch.inference_mode():
            stream = final_stream(expert, ids)
            switch = causal_lm_loss(seed.lm_head(seed.model.norm(stream)), ids).item()
            own = causal_lm_loss(expert(ids).logits, ids).item()
            base = causal_lm_loss(seed(ids).logits, ids).item()
        kept = (base - switch) / (base - own) if base != own else float("nan")
        print(f"{domain:<10}{base:9.4f}{own:9.4f}{switch:20.4f}{kept:11.0%}")


if __name__ == "__main__":
    main()
