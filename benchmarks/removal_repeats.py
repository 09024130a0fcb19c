"""Removing each expert from `bts_heads` (or `bts`) at every training seed of a repeated run, on
the report's test rows: how far the removed domain lands from the seed, and how far the other
domains move. Reads a result; nothing here chooses a setting.

    python benchmarks/removal_repeats.py RUN [stitched_heads|stitched]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bts.models import load_causal_lm
from bts.repeat import sample_sd
from bts.stages import Run
from bts.stitch import StitchedModel
from bts.sweep import removal_scores, validation_scores


def main(run_dir: Path, folder: str) -> None:
    run = Run.load(run_dir, lock=False)
    rows = run.config.eval.max_sequences
    seed = validation_scores(run, load_causal_lm(run.path("seed")), rows, validation=False)
    trained = {"0": run.path(folder)}
    trained |= {p.name.removeprefix("seed-"): p / folder
                for p in sorted(run.path("repeats").glob("seed-*")) if (p / folder).is_dir()}
    table = {}
    for name, path in trained.items():
        model = StitchedModel.from_pretrained(path)
        full = validation_scores(run, model, rows, validation=False)
        table[name] = removal_scores(run, model, full, rows, validation=False)
        print(f"training seed {name}:", " ".join(f"{k} {v:.4f}" for k, v in table[name].items()))
    print(f"{folder}, {len(table)} training seed(s), test rows ({rows} per set):")
    for domain in run.corpus:
        past = [t[f"without:{domain}"] - seed[domain] for t in table.values()]
        print(f"  without {domain}: {np.mean(past):+.4f} ± {sample_sd(past):.4f} from the seed "
              f"({seed[domain]:.4f})")
    moved = [t["moved"] for t in table.values()]
    print(f"  largest move on another domain: {max(moved):.4f} (mean {np.mean(moved):.4f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "stitched_heads")
