"""Stitch-stage ablations on a finished run: what closes the gap to each domain's expert?

Trains the stitch layers of one run's seed and experts under several variants (learning rate,
scale gain, steps, placement, nn.Linear's default initialisation) with the project's training
loop and the run's stitch mix, then prints held-out loss per domain next to the seed's and each
domain's expert's, all measured in this one run on the same sequences.

    .venv/bin/python benchmarks/stitch_ablation.py runs/demo [--variants default,gain10 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bts.evaluate import held_out_loss
from bts.models import load_causal_lm
from bts.stages import Run, make_seed, stitch_sampler, train_expert
from bts.stitch import (
    EXPERTS_INTO_HUB,
    StitchedModel,
    default_placement,
    random_initialisation,
)
from bts.train import train

VARIANTS = {
    "gain1": {"gate_gain": 1.0},
    "gain10": {"gate_gain": 10.0},
    "gain30": {"gate_gain": 30.0},
    "gain10-lr1e-2": {"gate_gain": 10.0, "lr": 1e-2},
    "gain10-lr1e-3": {"gate_gain": 10.0, "lr": 1e-3},
    "gain10-3x-steps": {"gate_gain": 10.0, "steps_factor": 3},
    "gain10-all-e2h": {"gate_gain": 10.0, "all_experts_into_hub": True},
    "linear-init": {"linear_init": True},
    "no-dropout": {"gate_dropout": 0.0},
    "no-dropout-3x-steps": {"gate_dropout": 0.0, "steps_factor": 3},
}


def build(run: Run, variant: dict) -> StitchedModel:
    spec = run.config.stitch
    hub = load_causal_lm(make_seed(run))
    placement = spec.placement
    if variant.get("all_experts_into_hub"):
        layers = default_placement(hub.config.num_hidden_layers, spec.num_stitches)
        placement = [(p.after_layer, EXPERTS_INTO_HUB) for p in layers]
    model = StitchedModel.from_models(
        hub,
        {d: load_causal_lm(train_expert(run, d)) for d in run.config.expert_domains},
        placement=placement,
        num_stitches=spec.num_stitches,
        gate_dropout=variant.get("gate_dropout", spec.gate_dropout),
        gate_gain=variant.get("gate_gain", spec.gate_gain),
    )
    if variant.get("linear_init"):
        random_initialisation(model, run.config.seed)
    model.train_only()
    return model


def losses(model, run: Run, max_sequences: int) -> dict[str, float]:
    return {
        d: held_out_loss(model, data.held_out.array, 8, max_sequences).loss
        for d, data in run.corpus.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--max-sequences", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run = Run.load(args.run_dir)
    domains = list(run.corpus)
    rows = {"seed": losses(load_causal_lm(make_seed(run)), run, args.max_sequences)}
    rows["own expert"] = {
        d: losses(load_causal_lm(train_expert(run, d)), run, args.max_sequences)[d]
        for d in run.config.expert_domains
    }
    seconds = {}
    for name in args.variants.split(","):
        variant = VARIANTS[name]
        cfg = run.config.stitch.train.model_copy(
            update={
                "lr": variant.get("lr", run.config.stitch.train.lr),
                "steps": run.config.stitch.train.steps * variant.get("steps_factor", 1),
                "log_every": 10_000,
            }
        )
        model = build(run, variant)
        sampler = stitch_sampler(run, run.config.expert_domains, run.config.stitch)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            train(model, sampler.batch, cfg, Path(tmp), name=name)
        seconds[name] = time.perf_counter() - start
        rows[name] = losses(model, run, args.max_sequences)
        print(f"{name}: {rows[name]} ({seconds[name]:.0f} s)", flush=True)

    print(f"\nheld-out loss ({args.max_sequences} sequences per domain), run {args.run_dir}")
    print(f"{'system':<18}" + "".join(f"{d:>9}" for d in domains) + f"{'avg':>9}{'train s':>9}")
    for name, row in rows.items():
        values = [row.get(d, float("nan")) for d in domains]
        avg = sum(values) / len(values)
        print(
            f"{name:<18}"
            + "".join(f"{v:9.4f}" for v in values)
            + f"{avg:9.4f}{seconds.get(name, 0):9.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"losses": rows, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
