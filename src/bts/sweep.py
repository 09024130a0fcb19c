"""Choose settings on the validation split: a grid of config overlays, each trained with several
training seeds, scored on validation rows only (never the report's test rows).

A grid is a YAML file mapping point names to an overlay: `description`, `stitch` and/or
`baselines` sections merged key by key over the run's own config, and `system`, what the point
trains and scores (`bts`, the default, or one trained baseline such as `btx_top2` or `bam`).
Each (point, seed) is a repeat of the run at that training seed (`bts.repeat`: the batch order
and dropout masks follow the seed; the seed, experts and data are the run's own) that trains
only that system:

    RUN/sweeps/<grid>/<point>/seed-<s>/stitched/ or baselines/<system>/   what it trained
    RUN/sweeps/<grid>/<point>/seed-<s>/train/                              checkpoints (resumable)
    RUN/sweeps/<grid>/<point>/seed-<s>/validation.json                     its validation losses
    RUN/sweeps/<grid>/sweep.json                          every point: per seed, mean and sd

The best point has the lowest mean validation average; another point differs from it only
where the paired per-seed difference exceeds two standard deviations, otherwise it is a tie.
Jobs run seed by seed, so a sweep stopped early has every point at the same seeds.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bts.ablate import merge_overlay
from bts.compare import held_out_sets, load_baseline
from bts.config import RunConfig, parse_config
from bts.errors import BtsError
from bts.evaluate import held_out_loss
from bts.fileio import write_json
from bts.progress import progress
from bts.repeat import paired, repeat_config, sample_sd
from bts.stages import Run, baselines, once, stitch
from bts.stitch import StitchedModel

SWEEPS = "sweeps"
MAIN = "bts"
POINT_KEYS = {"description", "system", "stitch", "baselines"}
TRAINED = ("btx_soft", "btx_top1", "btx_top2", "expert_routing", "bam", "bam_adapters")


@dataclass(frozen=True)
class Point:
    name: str
    description: str
    system: str
    overlay: dict[str, Any]
    config: RunConfig  # the run's config with the overlay, training only `system`


def load_grid(path: Path, base: RunConfig) -> list[Point]:
    """Every point of a grid file, validated before any training."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise BtsError(f"sweep grid {path} not found: give a YAML file of named overlays") from None
    except yaml.YAMLError as err:
        raise BtsError(f"{path} is not valid YAML ({err.__class__.__name__}): fix it") from err
    if not isinstance(data, dict) or not data:
        raise BtsError(
            f"{path}: a sweep grid maps point names to overlays ({{name: {{stitch: ...}}}})"
        )
    return [load_point(str(name), point, base, f"{path}: {name}") for name, point in data.items()]


def load_point(name: str, data: Any, base: RunConfig, where: str) -> Point:
    if not isinstance(data, dict) or not set(data) <= POINT_KEYS:
        raise BtsError(
            f"{where}: a sweep point holds {', '.join(sorted(POINT_KEYS))} only (e.g. "
            "{stitch: {init: uniform}} or {system: btx_top2, baselines: {btx_train: {lr: 1e-3}}})"
        )
    system = data.get("system", MAIN)
    if system not in (MAIN, *TRAINED):
        raise BtsError(f"{where}: system '{system}' is not trained: use {MAIN} or one of {TRAINED}")
    merged = base.model_dump(mode="json")
    for section in ("stitch", "baselines"):
        merged[section] = merge_overlay(merged[section], data.get(section) or {})
    config = only(parse_config(merged, where), system, where)
    overlay = {k: v for k, v in data.items() if k in ("stitch", "baselines")}
    return Point(name, str(data.get("description", "")), system, overlay, config)


def only(config: RunConfig, system: str, where: str) -> RunConfig:
    """The config training `system` and no other baseline (the stitch stage is skipped for a
    baseline: a point trains one thing)."""
    b = config.baselines
    keep = {
        "btx": b.btx if system.startswith("btx_") else None,
        "btx_variants": [system[4:]] if system.startswith("btx_") else [],
        "expert_routing": b.expert_routing if system == "expert_routing" else None,
        "bam": b.bam if system == "bam" else None,
        "bam_adapters": b.bam_adapters if system == "bam_adapters" else None,
    }
    if system != MAIN and keep[system if system in keep else "btx"] is None:
        raise BtsError(f"{where}: the run's config has no {system}: enable it in `baselines`")
    return config.model_copy(update={"baselines": b.model_copy(update=keep)})


def validation_scores(run: Run, model, rows: int, validation: bool = True) -> dict[str, float]:
    """Validation loss per set (the first `rows` rows of each) and the mean over domains
    (`validation` False: the report's test rows, for reading a result, never for a choice)."""
    e = run.config.eval
    held = held_out_sets(run, validation=validation)
    scores = {d: held_out_loss(model, r, e.batch_size, rows).loss for d, r in held.items()}
    return {**scores, "average": float(np.mean([scores[d] for d in run.corpus]))}


def removal_scores(
    run: Run, model: StitchedModel, full: dict[str, float], rows: int, validation: bool = True
) -> dict[str, float]:
    """Per expert domain d, the loss on d's validation rows (test rows with `validation` False)
    with d's expert removed from a copy of `model` (`without:d`), and `moved`: the largest
    change on another domain over those removals (issue 16's test)."""
    scores, moved = {}, 0.0
    for domain in run.corpus:
        if domain not in model.expert_names:
            continue
        minus = copy.deepcopy(model)  # not reloaded: loading re-hashes every constituent
        minus.remove_expert(domain)
        losses = validation_scores(run, minus, rows, validation)
        del minus
        scores[f"without:{domain}"] = losses[domain]
        others = [abs(losses[d] - full[d]) for d in run.corpus if d != domain]
        moved = max([moved, *others])
    return {**scores, "moved": moved}


def sweep(
    run: Run, grid: Path, seeds: list[int], rows: int, removal: bool = False
) -> dict[str, Any]:
    """Train and score every (point, seed) not already done; write and return sweep.json.
    With `removal`, every bts point is also scored without each expert (`removal_scores`)."""
    if not seeds:
        raise BtsError("--seeds is empty: give at least one training seed, e.g. 0,1,2")
    points = load_grid(grid, run.config)
    home = run.path(SWEEPS, Path(grid).stem)
    jobs = [(p, s) for s in seeds for p in points]  # seed by seed: stopped early, it is even
    results: dict[str, dict[int, dict[str, float]]] = {p.name: {} for p in points}
    for point, seed in progress(jobs, desc="sweep", unit="run"):
        results[point.name][seed] = _score_point(run, point, seed, home / point.name, rows, removal)
    summary = summarise(points, results, seeds, rows)
    once(write_json, home / "sweep.json", summary)
    return summary


def _score_point(
    run: Run, point: Point, seed: int, home: Path, rows: int, removal: bool
) -> dict[str, float]:
    where = home / f"seed-{seed}"
    record = where / "validation.json"
    removal = removal and point.system == MAIN
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("rows") == rows and (not removal or "moved" in saved["scores"]):
            return saved["scores"]
    trial = Run(repeat_config(point.config, seed), where, shared=run.root)
    if point.system == MAIN:
        model = StitchedModel.from_pretrained(stitch(trial))
    else:
        model = load_baseline(point.system, baselines(trial)[point.system])
    scores = validation_scores(trial, model, rows)
    if removal:
        scores |= removal_scores(trial, model, scores, rows)
    once(write_json, record, {"point": point.name, "seed": seed, "rows": rows, "scores": scores})
    return scores


def summarise(
    points: list[Point], results: dict[str, dict[int, dict[str, float]]], seeds, rows: int
) -> dict[str, Any]:
    """Mean and sd per point and column; the best point and each other point's paired verdict."""
    columns = [c for c in next(iter(next(iter(results.values())).values()))
               if all(c in results[p.name][s] for p in points for s in seeds)]
    table = {}
    for p in points:
        per_seed = results[p.name]
        table[p.name] = {
            "description": p.description,
            "system": p.system,
            "overlay": p.overlay,
            "per_seed": {str(s): per_seed[s] for s in seeds},
            "mean": {c: float(np.mean([per_seed[s][c] for s in seeds])) for c in columns},
            "sd": {c: sample_sd([per_seed[s][c] for s in seeds]) for c in columns},
        }
    best = min(table, key=lambda n: table[n]["mean"]["average"])
    for name, entry in table.items():
        diffs = [results[name][s]["average"] - results[best][s]["average"] for s in seeds]
        mean, sd, decided = paired(diffs)
        worse = name != best and decided and mean > 0
        verdict = "best" if name == best else "worse" if worse else "tie"
        entry["vs_best"] = {"mean_diff": mean, "sd_diff": sd, "verdict": verdict}
    return {
        "split": "validation",
        "rows_per_set": rows,
        "seeds": seeds,
        "best": best,
        "points": table,
    }


def format_table(summary: dict[str, Any]) -> str:
    """One line per point, best first: mean +- sd of each column, and the verdict."""
    points = summary["points"]
    columns = list(next(iter(points.values()))["mean"])
    lines = [f"{'point':<24}" + "".join(f"{c:>18}" for c in columns) + "   vs best"]
    for name, e in sorted(points.items(), key=lambda kv: kv[1]["mean"]["average"]):
        cells = "".join(f"{e['mean'][c]:>10.4f} ±{e['sd'][c]:<6.4f}" for c in columns)
        v = e["vs_best"]
        lines.append(f"{name:<24}{cells}   {v['verdict']} ({v['mean_diff']:+.4f})")
    return "\n".join(lines)
