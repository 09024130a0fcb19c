"""Where in a row bts_heads loses to each domain's expert: mean next-token loss by position
bucket on the validation rows, for bts_heads, BTM, expert routing and the domain's expert.

    python benchmarks/position_losses.py RUN [ROWS]

Expert routing picks its model from the row's first `eval_prefix` tokens and then scores the
whole row with it, prefix included; a causal system must guess the domain at those positions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from bts.baselines.btm import load_btm
from bts.compare import held_out_sets, load_baseline
from bts.evaluate import _token_losses
from bts.models import load_causal_lm
from bts.stages import HEADS_DIR, Run
from bts.stitch import StitchedModel

EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH = 8


def token_losses(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_token_losses(model, rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)])


def main(run_dir: Path, limit: int) -> None:
    run = Run.load(run_dir, lock=False)
    held = held_out_sets(run, validation=True)
    domains = [d for d in run.config.expert_domains if d in held]
    systems = {
        "bts_heads": StitchedModel.from_pretrained(run.path(HEADS_DIR)).eval(),
        "btm": load_btm(run.path("seed"), {d: run.path("experts", d) for d in domains}).eval(),
        "expert_routing": load_baseline("expert_routing", run.path("baselines", "expert_routing")).eval(),
    }
    for domain in domains:
        rows = torch.as_tensor(np.asarray(held[domain][:limit]).astype(np.int64))
        losses = {name: token_losses(m, rows) for name, m in systems.items()}
        losses["expert"] = token_losses(load_causal_lm(run.path("experts", domain)).eval(), rows)
        print(f"{domain} ({len(rows)} rows of {rows.shape[1]}): "
              + " ".join(f"{k} {float(v.mean()):.4f}" for k, v in losses.items()))
        for lo, hi in zip(EDGES, EDGES[1:], strict=False):
            if lo >= rows.shape[1] - 1:
                break
            cells = " ".join(f"{k} {float(v[:, lo:hi].mean()):.4f}" for k, v in losses.items())
            print(f"  positions {lo:>3}-{min(hi, rows.shape[1] - 1):<3} {cells}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64)
