"""Ablations of BTS itself: re-run only the stitch stage of a finished run under a config overlay.

An overlay is a YAML file (<name>.yaml) with a `description` and a `stitch` section that is
merged key by key over the run's own stitch config; the seed and the experts are the run's, so
each ablation changes exactly one thing. The shipped overlays are package data
(src/bts/ablations/, shown by `bts ablate RUN --list`), found from any working directory.
Results join the run's report: `report.json["ablations"][name]` and an ablations table in
report.md. `--system bts_heads` merges the overlay over the `bts_heads` stage's config (the
output stitch on) instead, and names the ablation `bts_heads/<name>`.

    RUN/ablations/<name>/stitched/   the ablated stitched model
    RUN/train/ablations/<name>/      its training checkpoint and metrics (the curves)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bts.config import RunConfig, parse_config
from bts.errors import BtsError
from bts.fileio import write_json
from bts.progress import progress
from bts.stages import Run, once, train_stitched
from bts.stitch import StitchedModel

# The shipped overlays, inside the installed package: found from any working directory.
DEFAULT_DIR = Path(str(resources.files("bts") / "ablations"))
OVERLAY_KEYS = {"description", "stitch"}
# the systems an overlay can change: each one's stitch config, from the run's config
SYSTEMS = {"bts": lambda config: config, "bts_heads": RunConfig.heads_config}


@dataclass(frozen=True)
class Ablation:
    name: str
    description: str
    overlay: dict[str, Any]
    config: RunConfig
    system: str = "bts"


def overlay_paths(names: list[str], directory: Path | None = None) -> list[Path]:
    """Names resolve to DIR/<name>.yaml (a path to a YAML file is taken as is); none: all in DIR.

    DIR defaults to the overlays shipped with bts (DEFAULT_DIR).
    """
    directory = DEFAULT_DIR if directory is None else directory
    if not names:
        found = sorted(Path(directory).glob("*.yaml"))
        if not found:
            raise BtsError(f"no ablation overlays in {directory}: pass --overlays DIR")
        return found
    paths = []
    for name in names:
        path = Path(name) if name.endswith((".yaml", ".yml")) else Path(directory) / f"{name}.yaml"
        if not path.is_file():
            raise BtsError(
                f"ablation overlay {path} not found: `bts ablate RUN --list` shows those in "
                f"{directory}"
            )
        paths.append(path)
    return paths


def load_ablation(path: Path, base: RunConfig, system: str = "bts") -> Ablation:
    """Merge an overlay over `system`'s config in the run and validate it like any run config."""
    if system not in SYSTEMS:
        raise BtsError(f"bts ablate cannot change system {system!r}: use one of {sorted(SYSTEMS)}")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise BtsError(
            f"{path} is not valid YAML ({err.__class__.__name__}): fix its syntax"
        ) from err
    if not isinstance(data, dict) or not set(data) <= OVERLAY_KEYS or "stitch" not in data:
        raise BtsError(
            f"{path}: an ablation overlay holds `description` and a `stitch` section only "
            "(it re-runs the stitch stage on the run's seed and experts)"
        )
    merged = SYSTEMS[system](base).model_dump(mode="json")
    merged["stitch"] = merge_overlay(merged["stitch"], data["stitch"] or {})
    config = parse_config(merged, str(path))
    name = Path(path).stem if system == "bts" else f"{system}/{Path(path).stem}"
    return Ablation(name, str(data.get("description", "")), data["stitch"], config, system)


def merge_overlay(base: dict, overlay: dict) -> dict:
    """A config section with an overlay merged over it key by key (nested sections too)."""
    if "variant" in overlay and "init" not in overlay:  # the variant picks its own init
        base = {k: v for k, v in base.items() if k != "init"}
    return _merge(base, overlay)


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "weights":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def ablate(run: Run, paths: list[Path], system: str = "bts") -> Path:
    """Train and evaluate each ablation, add it to report.json, and re-render the report."""
    from bts.compare import configure, evaluate_system, read_report

    ablations = [load_ablation(p, run.config, system) for p in paths]  # all validated before any work
    report = read_report(run)
    results = dict(report.get("ablations", {}))
    for ab in progress(ablations, desc="ablate", unit="ablation"):
        stage = f"ablations/{ab.name}"
        stitched = train_stitched(run, ab.config, run.path("ablations", ab.name, "stitched"), stage)
        model = configure(StitchedModel.from_pretrained(stitched), run)
        model.train_only()
        summary = evaluate_system(run, ab.name, model, stage, tasks=["loss", "humaneval_loss"])
        results[ab.name] = {
            "description": ab.description, "overlay": ab.overlay, "system": ab.system, **summary
        }
        del model
    report["ablations"] = results
    once(write_json, run.path("report.json"), report)
    from bts.report import write_report

    return write_report(run.root)


def describe(paths: list[Path], base: RunConfig, system: str = "bts") -> str:
    """One line per overlay (for `bts ablate --list`)."""
    lines = []
    for path in paths:
        ab = load_ablation(path, base, system)
        lines.append(f"{ab.name:<20} {ab.description}  {json.dumps(ab.overlay)}")
    return "\n".join(lines)
