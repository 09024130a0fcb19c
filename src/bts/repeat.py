"""Repeated training seeds: re-train the stitch stage and every trained baseline with other
training seeds, and put mean +- sd into the report, so a difference can be told from noise.

Training seed s sets `train.seed` of the stitch stage and of each trained baseline's schedule;
the stitch mix's data order follows it (`stages.stitch_sampler`), so every seed sees its own
batches and dropout masks. The seed, the experts, the tokenizer and the data are the run's own
(a repeat shares them), and nothing untrained (merges, BTM) is repeated: it cannot change.

    RUN/repeats/seed-<s>/stitched/, baselines/<name>/   the re-trained systems
    RUN/repeats/seed-<s>/train/...                       their checkpoints (resumable)
    RUN/repeats/seed-<s>/losses.json                     their test losses, by evaluation key

Seed `stitch.train.seed` (0) is the run itself. `report.json["repeats"]` holds every system's
per-seed losses, mean and sd, and bts's paired difference to each: a direction only where
|mean difference| > 2 sd, a tie otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bts.compare import evaluate_system, evaluation_key, read_report, systems
from bts.config import RunConfig
from bts.errors import BtsError
from bts.fileio import write_json
from bts.progress import progress
from bts.report import attach_repeats, write_report
from bts.stages import Run, once
from bts.train import RESULT, TrainConfig

REPEATS = "repeats"
MAIN = "bts"


def with_train_seed(config: RunConfig, seed: int) -> RunConfig:
    """The config with `stitch.train.seed = seed` (batch order and dropout follow it)."""
    stitch = config.stitch.model_copy(
        update={"train": config.stitch.train.model_copy(update={"seed": seed})}
    )
    return config.model_copy(update={"stitch": stitch})


def repeat_config(config: RunConfig, seed: int) -> RunConfig:
    """The run's config at training seed `seed`, without what training cannot change."""
    config = with_train_seed(config, seed)
    baselines = config.baselines
    changes: dict[str, Any] = {"merges": [], "btm": False}
    for key, value in baselines:
        if isinstance(value, TrainConfig):  # a baseline's own schedule: its seed too
            changes[key] = value.model_copy(update={"seed": seed})
    return config.model_copy(update={"baselines": baselines.model_copy(update=changes)})


def repeat_run(run: Run, seed: int) -> Run:
    """A run at another training seed that shares the seed, experts and data of `run`."""
    return Run(repeat_config(run.config, seed), run.path(REPEATS, f"seed-{seed}"), shared=run.root)


def repeat(run: Run, count: int) -> Path:
    """Train and score seeds base+1 .. base+count-1 (base: the run's own), then write the
    repeats into report.json and re-render the report."""
    if count < 2:
        raise BtsError(f"--seeds is {count}: give at least 2 (the run's own seed and one more)")
    report = read_report(run)
    base = run.config.stitch.train.seed
    seeds = [base + i for i in range(count)]
    per_seed: dict[str, dict[int, dict[str, float]]] = {}
    for seed in progress(seeds[1:], desc="repeat", unit="seed"):
        for name, losses in _seed_losses(repeat_run(run, seed)).items():
            per_seed.setdefault(name, {})[seed] = losses
    for name in per_seed:
        per_seed[name][base] = report["systems"][name]["loss"]
    attach_repeats(report, summarise(per_seed, list(report["domains"]), seeds))
    once(write_json, run.path("report.json"), report)
    return write_report(run.root)


def _seed_losses(run: Run) -> dict[str, dict[str, float]]:
    """Test losses of every trained system of one repeat (cached by evaluation key)."""
    cache_path = run.path("losses.json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    out = {}
    for name, load, stage, paths in systems(run):
        if name != MAIN and (stage is None or not run.path("train", stage).is_dir()):
            continue  # untrained (the shared seed and experts, bts-minus): nothing to repeat
        result = run.path("train", stage, RESULT) if stage else None
        files = [*paths, *([result] if result is not None and result.is_file() else [])]
        key = evaluation_key(run, name, files)
        if cache.get(name, {}).get("key") != key:
            model = load()
            summary = evaluate_system(run, name, model, stage, tasks=["loss"])
            cache[name] = {"key": key, "loss": summary["loss"]}
            once(write_json, cache_path, cache)
            del model
        out[name] = cache[name]["loss"]
    return out


def summarise(
    per_seed: dict[str, dict[int, dict[str, float]]], domains: list[str], seeds: list[int]
) -> dict[str, Any]:
    """Mean and sd over seeds per system and column, and bts's paired difference to each."""
    columns = [*domains, "average"]

    def row(losses: dict[str, float]) -> dict[str, float]:
        return {**losses, "average": float(np.mean([losses[d] for d in domains]))}

    rows = {n: {s: row(per_seed[n][s]) for s in seeds} for n in per_seed}
    table = {
        name: {
            "per_seed": {str(s): rows[name][s] for s in seeds},
            "mean": {c: float(np.mean([rows[name][s][c] for s in seeds])) for c in columns},
            "sd": {c: sample_sd([rows[name][s][c] for s in seeds]) for c in columns},
        }
        for name in rows
    }
    versus = {}
    if MAIN in rows:
        for name in rows:
            if name == MAIN:
                continue
            diffs = [rows[MAIN][s]["average"] - rows[name][s]["average"] for s in seeds]
            mean, sd, decided = paired(diffs)
            verdict = ("lower" if mean < 0 else "higher") if decided else "tie"
            versus[name] = {"mean_diff": mean, "sd_diff": sd, "verdict": verdict}
    return {"seeds": seeds, "split": "test", "systems": table, "bts_vs": versus}


def sample_sd(values: list[float]) -> float:
    """The sample standard deviation; NaN for a single value (one seed shows no spread)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def paired(diffs: list[float]) -> tuple[float, float, bool]:
    """Mean and sd of paired per-seed differences, and whether |mean| exceeds two sd (the
    project's rule for a direction; never with one seed)."""
    mean, sd = float(np.mean(diffs)), sample_sd(diffs)
    return mean, sd, not math.isnan(sd) and abs(mean) > 2 * sd
