"""Expert routing scored causally and as before issue 16, on the report's test rows, for the
run's router and each repeat's (`bts repeat`), side by side:

    python benchmarks/routing_causal.py RUN [OUT.json]

`causal`: position t is predicted by the model routed on the tokens up to t (the default now).
`prefix_read`: each row routed once on its first eval_prefix tokens, which it then also scores
(the earlier protocol, `expert_routing: {causal: false}`). docs/baselines.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bts.baselines.routing import RoutedModel, load_routing
from bts.compare import held_out_sets
from bts.evaluate import held_out_loss
from bts.repeat import sample_sd
from bts.stages import Run


def routers(run: Run) -> dict[str, Path]:
    """The run's router (seed 0) and each repeat's, by training seed."""
    found = {"0": run.path("baselines", "expert_routing")}
    for seed in sorted(run.path("repeats").glob("seed-*")):
        path = seed / "baselines" / "expert_routing"
        if path.is_dir():
            found[seed.name.removeprefix("seed-")] = path
    return found


def scores(run: Run, routed: RoutedModel, held: dict) -> dict[str, float]:
    e = run.config.eval
    losses = {d: held_out_loss(routed, r, e.batch_size, e.max_sequences).loss
              for d, r in held.items()}
    return losses | {"average": float(np.mean([losses[d] for d in run.corpus]))}


def main(run_dir: Path, out: Path | None) -> None:
    run = Run.load(run_dir, lock=False)
    held = held_out_sets(run)
    table: dict[str, dict[str, dict[str, float]]] = {"causal": {}, "prefix_read": {}}
    for seed, path in routers(run).items():
        routed = load_routing(path)
        for protocol, causal in (("causal", True), ("prefix_read", False)):
            spec = routed.spec.model_copy(update={"causal": causal})
            model = RoutedModel(spec, dict(routed.models.items()), routed.router)
            table[protocol][seed] = scores(run, model, held)
            print(f"seed {seed} {protocol:12}", " ".join(
                f"{k} {v:.4f}" for k, v in table[protocol][seed].items()), flush=True)
    summary = {}
    for protocol, per_seed in table.items():
        columns = list(next(iter(per_seed.values())))
        values = {c: [s[c] for s in per_seed.values()] for c in columns}
        summary[protocol] = {
            "per_seed": per_seed,
            "mean": {c: float(np.mean(v)) for c, v in values.items()},
            "sd": {c: sample_sd(v) for c, v in values.items()},
        }
        print(f"{protocol:12} mean ± sd over {len(per_seed)} seed(s):", " ".join(
            f"{c} {summary[protocol]['mean'][c]:.4f} ± {summary[protocol]['sd'][c]:.4f}"
            for c in columns))
    if out is not None:
        out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
