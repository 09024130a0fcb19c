"""Validation losses of a run's untrained or already-trained whole-model systems (BTM, expert
routing, the seed), on the rows `bts sweep` scores (64 per set), for reading a sweep against them:

    python benchmarks/validation_scores.py RUN [OUT.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bts.baselines.btm import load_btm
from bts.compare import held_out_sets, load_baseline
from bts.evaluate import held_out_loss
from bts.models import load_causal_lm
from bts.stages import Run

ROWS = 64  # as `bts sweep --rows`


def main(run_dir: Path, out: Path | None) -> None:
    run = Run.load(run_dir, lock=False)
    held = held_out_sets(run, validation=True)
    systems = {
        "btm": lambda: load_btm(
            run.path("seed"), {d: run.path("experts", d) for d in run.config.expert_domains}
        ),
        "expert_routing": lambda: load_baseline(
            "expert_routing", run.path("baselines", "expert_routing")
        ),
        "seed": lambda: load_causal_lm(run.path("seed")),
    }
    scores = {}
    for name, load in systems.items():
        model = load()
        losses = {d: held_out_loss(model, rows, 8, ROWS).loss for d, rows in held.items()}
        domains = [d for d in losses if d in run.corpus]
        losses["average"] = float(np.mean([losses[d] for d in domains]))
        scores[name] = losses
        print(name, " ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    if out is not None:
        out.write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
