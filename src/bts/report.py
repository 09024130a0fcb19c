"""The human report of a run: markdown tables and PNG plots from measured results.

Reads only plain files other stages wrote (report.json, gates.json, metrics.jsonl) and
computes nothing about models, so it stays light: no torch, matplotlib through Agg only.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.patheffects import Normal, Stroke

from bts.baselines.registry import REPORT_ROWS, SINGLE_MODEL, WHOLE_EXPERTS
from bts.errors import BtsError
from bts.fileio import write_text
from bts.progress import duration

EXPERT_PREFIX = "expert:"
HEADS = "bts_heads"  # bts with the output stitch (the experts' own heads)
STITCHED = ("bts", HEADS)  # stitched systems: `<base>-minus:<domain>` rows, ablation bases
REMOVAL_PREFIXES = tuple(f"{base}-minus:" for base in STITCHED)
ABLATIONS_PREFIX = "ablations/"
BASE_STAGES = {"bts": "stitch", HEADS: "stitch_heads"}  # the stage an ablation of each re-runs
SWITCH_SETS = ("domain_switch",)  # held-out rows that change domain mid-way (bts.compare)
MAX_TOKENS = 64  # per-token gate plot: wider figures make unreadable labels
MAX_TOKEN_CHARS = 10
EMA_SPANS = 30  # a training curve is smoothed by an EMA spanning 1/30 of its points
DASH = "–"
AVERAGE = "average"
ONE_RUN_NOTE = (
    "(One run; differences under two standard deviations over seeds cannot be told apart "
    "without repeating it over seeds: `bts repeat RUN --seeds 3`.)"
)
TABLE_WIDTH = 100  # headline_table: the widest terminal line it aims for
IMAGE_FILES = {
    "loss_vs_seed": "loss_vs_seed.png",
    "training_curves": "training_curves.png",
    "gates_layers": "gates_layers.png",
    "gates_tokens": "gates_tokens.png",
    "gates_output": "gates_output.png",
    "ablation_curves": "ablation_curves.png",
}

# ---------------------------------------------------------------- numbers and ordering


def average_loss(system: Mapping[str, Any], domains: Sequence[str]) -> float:
    """Mean of the system's per-domain losses over `domains`; NaN if any domain is missing."""
    losses = system.get("loss", {})
    if not domains or any(_number(losses.get(d)) is None for d in domains):
        return math.nan
    return sum(losses[d] for d in domains) / len(domains)


def ordered_systems(report: Mapping[str, Any]) -> list[str]:
    """Main-table systems in reading order: seed, experts, bts, merges, btx, then others."""
    domains = list(report["domains"])
    names = [
        n
        for n, s in report["systems"].items()
        if not n.startswith(REMOVAL_PREFIXES) and "alias_of" not in s
    ]
    return sorted(names, key=lambda n: _system_rank(n, domains))


def _system_rank(name: str, domains: list[str]) -> tuple[int, int, str]:
    """Sort key: group, position inside the group, name (for systems we do not know)."""
    if name == "seed":
        return (0, 0, "")
    if name.startswith(EXPERT_PREFIX):
        domain = name[len(EXPERT_PREFIX) :]
        return (1, domains.index(domain) if domain in domains else len(domains), domain)
    if name in STITCHED:
        return (2, STITCHED.index(name), "")
    if name in REPORT_ROWS:  # the merges, then the paper's other alternatives (Table 3 order)
        return (3, REPORT_ROWS.index(name), "")
    return (4, 0, name)


def removed_domains(report: Mapping[str, Any], base: str = "bts") -> list[str]:
    """Domains whose expert was removed in a `bts-minus:<domain>` system, in domain order."""
    domains = list(report["domains"])
    prefix = f"{base}-minus:"
    removed = [n[len(prefix) :] for n in report["systems"] if n.startswith(prefix)]
    return sorted(removed, key=lambda d: (domains.index(d) if d in domains else len(domains), d))


def _number(value: Any) -> float | None:
    """The value as a finite float, or None (missing, null, NaN)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _loss_keys(report: Mapping[str, Any], names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(domains, extra loss keys such as humaneval_loss), extras in first-seen order."""
    domains = list(report["domains"])
    extras: list[str] = []
    for name in names:
        for key in report["systems"][name].get("loss", {}):
            if key not in domains and key not in extras:
                extras.append(key)
    return domains, extras


def _accuracy_tasks(report: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """Accuracy task names across the systems, in first-seen order."""
    tasks: list[str] = []
    for name in names:
        tasks += [t for t in report["systems"][name].get("accuracy", {}) if t not in tasks]
    return tasks


def _fmt_loss(value: float) -> str:
    return f"{value:.4f}"


def _fmt_delta(value: float) -> str:
    return f"{value:+.4f}"


def _fmt_count(n: float) -> str:
    """Human count: 134.5M, 2.1B, 950."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_seconds(s: float) -> str:
    return f"{s:,.1f}"


# ---------------------------------------------------------------- what the run shows


def ranked_systems(report: Mapping[str, Any]) -> list[str]:
    """`ordered_systems` sorted by average held-out loss, best first.

    Systems without an average (a domain not measured) come last; equal averages keep reading
    order. Aliases (`alias_of`) and `bts-minus:*` rows are left out, as in the results table.
    """
    domains = list(report["domains"])

    def key(name: str) -> tuple[bool, float]:
        avg = _number(average_loss(report["systems"][name], domains))
        return (avg is None, 0.0 if avg is None else avg)

    return sorted(ordered_systems(report), key=key)


def summary_columns(report: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """Domains, then the domain-switch set if any of `names` has it, then AVERAGE."""
    switch = [
        k
        for k in SWITCH_SETS
        if any(_number(report["systems"][n].get("loss", {}).get(k)) is not None for n in names)
    ]
    return [*report["domains"], *switch, AVERAGE]


def _column_value(system: Mapping[str, Any], column: str, domains: Sequence[str]) -> float | None:
    """A system's loss on one summary column (AVERAGE: the mean over domains), or None."""
    if column == AVERAGE:
        return _number(average_loss(system, domains))
    return _number(system.get("loss", {}).get(column))


def loss_vs_seed(report: Mapping[str, Any]) -> tuple[list[str], list[str], np.ndarray]:
    """(rows, columns, deltas): every ranked system's loss minus the seed's on each column.

    Rows follow `ranked_systems` (best average first); columns follow `summary_columns`;
    a delta is NaN where the system or the seed lacks the column. The seed row is all zeros.
    """
    if "seed" not in report["systems"]:
        raise BtsError("report.json has no 'seed' system to compare against: rerun `bts run`")
    names, domains = ranked_systems(report), list(report["domains"])
    columns = summary_columns(report, names)
    seed = report["systems"]["seed"]
    deltas = np.full((len(names), len(columns)), math.nan)
    for j, column in enumerate(columns):
        base = _column_value(seed, column, domains)
        for i, name in enumerate(names):
            value = _column_value(report["systems"][name], column, domains)
            if value is not None and base is not None:
                deltas[i, j] = value - base
    return names, columns, deltas


def best_cells(values: np.ndarray, fmt: Callable[[float], str]) -> np.ndarray:
    """Mask of the lowest cell(s) of each column: ties at the shown precision (`fmt`) all count;
    a column with fewer than two values marks nothing."""
    best = np.zeros(values.shape, dtype=bool)
    for j in range(values.shape[1]):
        present = [(i, v) for i, v in enumerate(values[:, j]) if math.isfinite(v)]
        if len(present) < 2:
            continue
        shown = fmt(min(v for _, v in present))
        for i, v in present:
            best[i, j] = fmt(v) == shown
    return best


def _seed_stats(system: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """(sd over seeds of the average loss, number of seeds) a repeated run recorded, if any."""
    seeds = system.get("seeds")
    count = len(seeds) if isinstance(seeds, list) else seeds if isinstance(seeds, int) else None
    return _number(system.get("average_sd")), count


def attach_repeats(report: dict[str, Any], repeats: dict[str, Any]) -> None:
    """Put `repeats` (`bts repeat`: bts.repeat.summarise) into report.json's `report`. Each
    repeated system gets its mean and sd over seeds of the average loss; each system the repeats
    do not re-train and that does not depend on the stitch stage (the seed, the experts, the
    merges, BTM) gets its one value with sd 0, since a training seed of the stitch stage cannot
    change it. Nothing is attached when the run's own seed no longer matches the repeats' row
    for it: a stage changed since the repeat."""
    base, domains = str(repeats["seeds"][0]), list(report["domains"])
    systems = report["systems"]
    for name, entry in repeats["systems"].items():
        own = systems.get(name, {}).get("loss", {})
        if any(own.get(d) != entry["per_seed"][base].get(d) for d in domains):
            return
    report["repeats"] = repeats
    for name, system in systems.items():
        entry = repeats["systems"].get(system.get("alias_of", name))
        if entry is not None:
            mean, sd = entry["mean"]["average"], entry["sd"]["average"]
        elif "-minus:" not in name and all(d in system.get("loss", {}) for d in domains):
            # not re-trained by a repeat (the seed, the shared experts, merges, BTM); a removal
            # row is the exception: it is bts without an expert, and follows bts's seed
            mean, sd = float(np.mean([system["loss"][d] for d in domains])), 0.0
        else:
            continue
        system.update(average_mean=mean, average_sd=sd, seeds=repeats["seeds"])


def _versus(report: Mapping[str, Any], a: str, b: str, avg: Mapping[str, float]) -> str:
    """'A vs B, lower by D ...' on the average; with both sds over seeds, the means over seeds
    are compared and a tie is a tie."""
    (sd_a, n_a), (sd_b, n_b) = (_seed_stats(report["systems"][n]) for n in (a, b))
    repeated = sd_a is not None and sd_b is not None

    def value(name: str) -> float:  # the mean over seeds where repeats give one, else this run's
        mean = _number(report["systems"][name].get("average_mean")) if repeated else None
        return avg[name] if mean is None else mean

    value_a, value_b = value(a), value(b)
    diff = value_a - value_b
    shown = f"{value_a:.4f} vs {value_b:.4f}"
    if f"{abs(diff):.4f}" == "0.0000":
        direction = "equal to 4 decimals"
    else:
        direction = f"{'lower' if diff < 0 else 'higher'} by {abs(diff):.4f}"
    if not repeated:
        return f"{shown}, {direction} in this run"
    sd = math.hypot(sd_a, sd_b)  # sd of the difference of two independent means
    seeds = f" over {min(n_a, n_b)} seeds" if n_a and n_b else " over seeds"
    shown += f" (means{seeds})" if _number(report["systems"][a].get("average_mean")) else ""
    if abs(diff) < 2 * sd:
        return f"{shown}, within two standard deviations ({2 * sd:.4f}){seeds}: a tie"
    return f"{shown}, {direction}, beyond two standard deviations ({2 * sd:.4f}){seeds}"


def _single_model(name: str) -> bool:
    """One model to deploy (merges, the soups, BTX variants, BAM with and without adapters);
    not BTM or expert routing (several models), experts, bts-minus rows or ablations."""
    return name in SINGLE_MODEL


def what_it_shows(report: Mapping[str, Any]) -> str:
    """A few sentences from the numbers: the best system by average held-out loss, `bts`
    against the best single-model alternative and against the seed, and how far to trust them.

    Single-model alternatives yield one deployable model: the merges, the soup, `btx_*` and
    `bam` (not `btm`, `expert_routing`, experts, `bts-minus:*` or ablations). A comparison is a
    tie-or-not statement only when both systems carry `average_sd` (sd over repeated seeds of
    the average loss; `seeds` may give their number); report.json from `bts run` carries none,
    so comparisons read "lower/higher in this run" and end with ONE_RUN_NOTE. Markdown
    (backticks around names); "" when no system has an average.
    """
    domains = list(report["domains"])
    systems = report["systems"]
    avg = {
        n: a
        for n in ranked_systems(report)
        if (a := _number(average_loss(systems[n], domains))) is not None
    }
    if not avg:
        return ""
    best = next(iter(avg))
    over = f"over the {len(domains)} domains" if len(domains) > 1 else f"on {domains[0]}"
    first = f"Lowest average held-out loss {over}: `{best}`, {avg[best]:.4f}"
    if "seed" in avg and best != "seed":
        first += f" (seed {avg['seed']:.4f})"
    sentences = [first + "."]
    single = [n for n in avg if _single_model(n)]
    if "bts" in avg and single:
        also = " (also the lowest overall)" if single[0] == best else ""
        sentences.append(
            f"`bts` against the best single-model alternative, `{single[0]}`{also}: "
            f"{_versus(report, 'bts', single[0], avg)}."
        )
    elif single:
        sentences.append(
            f"Best single-model system: `{single[0]}`, {avg[single[0]]:.4f} (no `bts` measured)."
        )
    if "bts" in avg and "seed" in avg:
        sentences.append(f"`bts` against the seed: {_versus(report, 'bts', 'seed', avg)}.")
    # bts_heads keeps every expert whole, so it is read against the systems that do as well
    whole = [n for n in WHOLE_EXPERTS if HEADS in avg and n in avg]
    for name in whole:
        sentences.append(f"`{HEADS}` against `{name}`: {_versus(report, HEADS, name, avg)}.")
    compared = ["bts", single[0]] if "bts" in avg and single else ["bts"]
    compared = [n for n in [*compared, "seed", *([HEADS] if whole else []), *whole] if n in avg]
    if not all(_seed_stats(systems[n])[0] is not None for n in compared):
        sentences.append(ONE_RUN_NOTE)
    return " ".join(sentences)


def headline_table(report: Mapping[str, Any], *, summary: bool = True) -> str:
    """Plain-text table for the terminal: every system (as `ranked_systems`, best average
    first) with its loss per domain, on the domain-switch set if measured, the average over the
    domains, and the average minus the seed's. The lowest value of each column ends in '*'.

    Fixed-width columns, about TABLE_WIDTH characters or less: with many domains, headers that
    do not fit become [k] and are named under the table, and long system names are cut. With `summary` (the default), the `what_it_shows` sentences follow under the
    table, without markdown backticks and wrapped to TABLE_WIDTH; pass summary=False for the
    table alone and call `what_it_shows` for the markdown text.
    """
    names, domains = ranked_systems(report), list(report["domains"])
    if not names:
        return "no systems in report.json"
    columns = summary_columns(report, names)
    seed_avg = (
        _number(average_loss(report["systems"]["seed"], domains))
        if "seed" in report["systems"]
        else None
    )
    values = np.array(
        [
            [
                math.nan if (v := _column_value(report["systems"][n], c, domains)) is None else v
                for c in columns
            ]
            for n in names
        ]
    )
    deltas = values[:, -1:] - (math.nan if seed_avg is None else seed_avg)
    marks = np.hstack([best_cells(values, _fmt_loss), best_cells(deltas, _fmt_delta)])
    cells = [
        [
            DASH if not math.isfinite(v) else fmt(v) + ("*" if marks[i, j] else " ")
            for j, (v, fmt) in enumerate(
                [(v, _fmt_loss) for v in values[i]] + [(deltas[i, 0], _fmt_delta)]
            )
        ]
        for i in range(len(names))
    ]
    headers = [("avg" if c == AVERAGE else c) for c in columns] + ["Δ seed"]
    # narrowest cells: "5.9111*" (7) and "-0.3205*" (8); cut headers, then gaps, then names
    least = [7] * (len(headers) - 1) + [8]
    name_width = min(max(len(n) for n in [*names, "system"]), 24)
    for cap, gap in ((13, 2), (8, 2), (8, 1)):
        widths = [max(w, min(len(h), cap)) for w, h in zip(least, headers, strict=True)]
        if name_width + sum(w + gap for w in widths) <= TABLE_WIDTH:
            break
    name_width = max(12, min(name_width, TABLE_WIDTH - sum(w + gap for w in widths)))

    def cut(text: str, width: int) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    # a header that does not fit becomes [k], named under the table (cut names could clash)
    fits = [len(h) <= w for h, w in zip(headers, widths, strict=True)]
    legend = [f"[{j + 1}]={h}" for j, h in enumerate(headers) if not fits[j]]
    headers = [h if fits[j] else f"[{j + 1}]" for j, h in enumerate(headers)]

    def line(first: str, rest: Sequence[str]) -> str:
        parts = [cut(first, name_width).ljust(name_width)]
        parts += [cut(c, w).rjust(w) for c, w in zip(rest, widths, strict=True)]
        return (" " * gap).join(parts).rstrip()

    lines = [line("system", headers), line("-" * name_width, ["-" * w for w in widths])]
    lines += [line(n, row) for n, row in zip(names, cells, strict=True)]
    lines += [
        f"* lowest in its column; avg: mean over the {len(domains)} domains"
        + (" (not domain_switch)" if "domain_switch" in columns else ""),
        "Δ seed: avg minus the seed's avg (negative: lower loss than the seed)",
    ]
    if legend:
        lines.append(textwrap.fill("columns: " + ", ".join(legend), TABLE_WIDTH))
    if summary:
        text = what_it_shows(report).replace("`", "")
        if text:
            lines += ["", textwrap.fill(text, TABLE_WIDTH)]
    return "\n".join(lines)


# ---------------------------------------------------------------- markdown


@dataclass(frozen=True)
class _Column:
    """One table column: header, how to read a value from a system, which way is better."""

    title: str
    value: Callable[[Mapping[str, Any]], float | None]
    fmt: Callable[[float], str]
    better: str | None = None  # "min", "max", or None for columns that are not scores
    cell: Callable[[Mapping[str, Any]], str] | None = None  # a text cell instead of fmt(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text: Sequence[int] = (0,)) -> str:
    """A pipe table; columns whose index is in `text` left-aligned, numbers right-aligned."""
    align = [":---" if i in text else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _column_cells(column: _Column, systems: Sequence[Mapping[str, Any]]) -> list[str]:
    """Formatted cells of one column, the best bolded when at least two systems have a value."""
    if column.cell is not None:
        return [column.cell(s) for s in systems]
    values = [column.value(s) for s in systems]
    cells = [DASH if v is None else column.fmt(v) for v in values]
    present = [v for v in values if v is not None]
    if column.better is None or len(present) < 2:
        return cells
    best = column.fmt(min(present) if column.better == "min" else max(present))
    # Compare shown strings so that values equal to the shown precision are all bold.
    return [f"**{c}**" if c == best else c for c in cells]


def _main_columns(report: Mapping[str, Any], names: Sequence[str]) -> list[_Column]:
    """Columns of the results table: losses, average, extra losses, accuracies, costs."""
    domains, extras = _loss_keys(report, names)

    def loss(key: str) -> Callable[[Mapping[str, Any]], float | None]:
        return lambda s: _number(s.get("loss", {}).get(key))

    def acc(task: str) -> Callable[[Mapping[str, Any]], float | None]:
        return lambda s: _number(s.get("accuracy", {}).get(task))

    def field(key: str) -> Callable[[Mapping[str, Any]], float | None]:
        return lambda s: _number(s.get(key))

    columns = [_Column(f"{d} loss ↓", loss(d), _fmt_loss, "min") for d in domains]
    columns.append(
        _Column("avg loss ↓", lambda s: _number(average_loss(s, domains)), _fmt_loss, "min")
    )
    columns += [_Column(f"{k} ↓", loss(k), _fmt_loss, "min") for k in extras]
    columns += [_Column(f"{t} ↑", acc(t), _fmt_loss, "max") for t in _accuracy_tasks(report, names)]
    columns += [
        _Column("train tokens", field("train_tokens"), _fmt_count),
        _Column("train s", field("train_seconds"), _fmt_seconds),
        _Column("params total", field("params_total"), _fmt_count),
        _Column("params trained (share)", field("params_trained"), _fmt_count, None, _trained),
        _Column("params active / token", field("params_active"), _fmt_count),
    ]
    return columns


def _trained(system: Mapping[str, Any]) -> str:
    """Trained parameters and their share of the total (the paper reports 2.4% for BTS)."""
    trained, total = _number(system.get("params_trained")), _number(system.get("params_total"))
    if trained is None:
        return DASH
    share = f" ({100 * trained / total:.2f}%)" if total else ""
    return f"{_fmt_count(trained)}{share}"


def _results_section(report: Mapping[str, Any]) -> str:
    """The systems x measurements table."""
    names = ordered_systems(report)
    systems = [report["systems"][n] for n in names]
    columns = _main_columns(report, names)
    by_column = [_column_cells(c, systems) for c in columns]
    header = ["system", *[c.title for c in columns]]
    rows = [[f"`{name}`", *[cells[i] for cells in by_column]] for i, name in enumerate(names)]
    aliases = [
        f"`{n}` is `{s['alias_of']}`" for n, s in report["systems"].items() if "alias_of" in s
    ]
    skipped = [f"`{name}` ({why})" for name, why in (report.get("skipped") or {}).items()]
    return "\n\n".join(
        [
            "## Results",
            "Held-out loss per domain (lower is better, ↓) and task accuracy (higher is "
            "better, ↑); the best value of each column is in bold. Parameters: all the "
            "system holds, those its own stage trained, and those that compute one token."
            + (f" ({'; '.join(aliases)}.)" if aliases else "")
            + (f" Not run here: {'; '.join(skipped)}." if skipped else ""),
            _table(header, rows),
        ]
    )


def _ablation_section(report: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """One row per ablation: losses, average and its change against the system it changes
    (the run's own `bts`, or `bts_heads` for `bts ablate --system bts_heads`)."""
    ablations = report.get("ablations") or {}
    if not ablations:
        return ""
    domains = list(report["domains"])
    bases = {e.get("system", "bts") for e in ablations.values()}
    # extra held-out sets (e.g. domain_switch) after the average, as in the results table
    shown = [b for b in STITCHED if b in bases and b in report["systems"]]
    extras = [k for k in _loss_keys(report, shown)[1] if k in SWITCH_SETS]
    rows = []
    for base in shown:
        entry = report["systems"][base]
        rows.append([f"`{base}` (run config)", "", *_ablation_cells(entry, domains, extras), DASH])
    for name, entry in ablations.items():
        avg = _number(average_loss(entry, domains))
        base = report["systems"].get(entry.get("system", "bts"))
        base_avg = _number(average_loss(base, domains)) if base else None
        delta = _fmt_delta(avg - base_avg) if avg is not None and base_avg is not None else DASH
        rows.append(
            [
                f"`{name}`",
                entry.get("description", ""),
                *_ablation_cells(entry, domains, extras),
                delta,
            ]
        )
    header = [
        "ablation",
        "what changed",
        *[f"{d} loss ↓" for d in domains],
        "avg loss ↓",
        *[f"{k} ↓" for k in extras],
        "train tokens",
        "Δ avg vs its system",
    ]
    parts = [
        "## Ablations",
        "Each re-runs only the stitch stage on this run's seed and experts with one change "
        "(`bts ablate`), on the tokens its column shows; same evaluation.",
        _table(header, rows, text=(0, 1)),
    ]
    if "ablation_curves" in images:
        parts.append(f"![ablation training curves]({images['ablation_curves']})")
    return "\n\n".join(parts)


def _repeats_section(report: Mapping[str, Any]) -> str:
    """Mean +- sd over training seeds (`bts repeat`), and bts's paired difference to each
    system: a direction only beyond two standard deviations."""
    repeats = report.get("repeats")
    if not repeats:
        return ""
    domains = list(report["domains"])
    columns = [*domains, AVERAGE]
    versus = repeats.get("bts_vs", {})
    rows = []
    for name, entry in sorted(repeats["systems"].items(), key=lambda kv: kv[1]["mean"][AVERAGE]):
        cells = [f"{_fmt_loss(entry['mean'][c])} ± {entry['sd'][c]:.4f}" for c in columns]
        v = versus.get(name)
        shown = DASH if v is None else f"{v['mean_diff']:+.4f} ± {v['sd_diff']:.4f}: {v['verdict']}"
        rows.append([f"`{name}`", *cells, shown])
    header = ["system", *[f"{d} loss ↓" for d in domains], "avg loss ↓", "bts − system (paired)"]
    seeds = ", ".join(str(s) for s in repeats["seeds"])
    return "\n\n".join(
        [
            "## Repeated seeds",
            f"Training seeds {seeds} (`bts repeat`): each re-trains the stitch stage and every "
            "trained baseline with its own batch order and dropout masks; mean ± sd over seeds "
            "on the same test rows. The last column is bts's average minus the system's, paired "
            "by seed: `lower`/`higher` only beyond two standard deviations, else `tie`.",
            _table(header, rows, text=(0,)),
        ]
    )


def _ablation_cells(
    entry: Mapping[str, Any], domains: Sequence[str], extras: Sequence[str] = ()
) -> list[str]:
    losses = [_number(entry.get("loss", {}).get(d)) for d in domains]
    more = [_number(entry.get("loss", {}).get(k)) for k in extras]
    avg = _number(average_loss(entry, domains))
    tokens = _number(entry.get("train_tokens"))
    return [
        *[DASH if v is None else _fmt_loss(v) for v in losses],
        DASH if avg is None else _fmt_loss(avg),
        *[DASH if v is None else _fmt_loss(v) for v in more],
        DASH if tokens is None else _fmt_count(tokens),
    ]


def _loss_of(report: Mapping[str, Any], name: str, key: str) -> float | None:
    return _number(report["systems"].get(name, {}).get("loss", {}).get(key))


def _delta(a: float | None, b: float | None) -> str:
    return DASH if a is None or b is None else _fmt_delta(a - b)


def _removal_summary(
    report: Mapping[str, Any], domain: str, keys: Sequence[str], base: str = "bts"
) -> str:
    """One sentence: how far the removed domain moved, and the largest move elsewhere."""
    minus = f"{base}-minus:{domain}"
    full, cut, seed = (_loss_of(report, n, domain) for n in (base, minus, "seed"))
    if full is None or cut is None:
        return ""
    text = f"Removing `{domain}` changes its loss by {_fmt_delta(cut - full)}"
    if seed is not None:
        text += f" (the seed is {_fmt_delta(seed - full)} from {base})"
    others = [
        abs(b - a)
        for k in keys
        if k != domain
        for a, b in [(_loss_of(report, base, k), _loss_of(report, minus, k))]
        if a is not None and b is not None
    ]
    if others:
        text += f"; the largest change on another column is {max(others):.4f}"
    return text + "."


def _removal_section(report: Mapping[str, Any]) -> str:
    """Per removed expert: loss on every domain for bts (and bts_heads) vs the system without
    that expert vs the seed, with deltas."""
    bases = [b for b in STITCHED if removed_domains(report, b)]
    if not bases:
        return ""
    domains, extras = _loss_keys(report, list(report["systems"]))
    keys = domains + extras
    parts = [
        "## Removal experiment",
        "Each expert's stitch parameters dropped from the trained model, without retraining. "
        "Δ columns are the model without the expert minus the named system: the removed "
        "domain should move toward the seed while the others barely move.",
    ]
    for base in bases:
        for domain in removed_domains(report, base):
            minus = f"{base}-minus:{domain}"
            header = ["loss on", base, f"`{minus}`", "seed", f"Δ vs {base}", "Δ vs seed"]
            rows = []
            for key in keys:
                full, cut, seed = (_loss_of(report, n, key) for n in (base, minus, "seed"))
                label = f"**{key}** (removed)" if key == domain else key
                shown = [DASH if v is None else _fmt_loss(v) for v in (full, cut, seed)]
                rows.append([label, *shown, _delta(cut, full), _delta(cut, seed)])
            title = f"Without `{domain}`" if base == "bts" else f"{base} without `{domain}`"
            parts += [f"### {title}", _table(header, rows)]
            summary = _removal_summary(report, domain, keys, base)
            if summary:
                parts.append(summary)
    return "\n\n".join(parts)


def _check_gate_entry(domain: str, entry: Mapping[str, Any], rows_key: str) -> None:
    """Every row of gate weights must have one weight per source."""
    n = len(entry["sources"])
    if any(len(row) != n for row in entry["weights"]) or len(entry["weights"]) != len(
        entry[rows_key]
    ):
        raise BtsError(
            f"gates.json: '{domain}' weights do not match its {rows_key} x sources: "
            "regenerate gates.json with `bts run`"
        )


def last_layer_gates(entry: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(layer, weight per source) at the deepest experts-into-hub layer of one eval domain."""
    i = max(range(len(entry["layers"])), key=lambda j: entry["layers"][j])
    return entry["layers"][i], dict(zip(entry["sources"], entry["weights"][i], strict=True))


def _gate_section(gates: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """Average gate weight per source at the last experts-into-hub layer, per eval domain."""
    layer_mean = gates.get("layer_mean", {})
    parts = ["## Gate analysis"]
    if layer_mean:
        sources: list[str] = []
        rows = []
        for domain, entry in layer_mean.items():
            _check_gate_entry(domain, entry, "layers")
            sources += [s for s in entry["sources"] if s not in sources]
        for domain, entry in layer_mean.items():
            layer, weights = last_layer_gates(entry)
            experts = {s: w for s, w in weights.items() if s != "hub"}
            dominant = f"`{max(experts, key=experts.get)}`" if experts else DASH
            cells = [DASH if s not in weights else f"{weights[s]:.3f}" for s in sources]
            rows.append([domain, str(layer), *cells, dominant])
        parts += [
            "Experts-into-hub gate weights (softmax over hub and experts, averaged over "
            "hidden dimensions and tokens) at the last experts-into-hub layer.",
            _table(
                ["eval domain", "layer", *sources, "dominant expert"], rows, (0, len(sources) + 2)
            ),
        ]
    captions = {"gates_layers": "gate weights by layer", "gates_tokens": "gate weights by token"}
    parts += [f"![{text}]({images[k]})" for k, text in captions.items() if k in images]
    if gates.get("output"):
        parts.append(_output_gate_section(gates["output"], images))
    return "\n\n".join(parts)


def _output_gate_section(output: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """bts_heads: the output gate's mean weight per constituent head, per eval domain."""
    means = output.get("mean", {})
    sources: list[str] = []
    for entry in means.values():
        sources += [s for s in entry["sources"] if s not in sources]
    rows = []
    for domain, entry in means.items():
        weights = dict(zip(entry["sources"], entry["weights"], strict=True))
        rows.append([domain, *[DASH if s not in weights else f"{weights[s]:.3f}" for s in sources]])
    parts = [
        "### Output gate (`bts_heads`)",
        "Weight of each constituent's own next-token distribution in the output mixture, "
        "averaged over tokens.",
        _table(["eval domain", *sources], rows, (0,)),
    ]
    if "gates_output" in images:
        parts.append(f"![output gate by token]({images['gates_output']})")
    return "\n\n".join(parts)


def _timings_section(report: Mapping[str, Any]) -> str:
    """Wall time and peak memory per stage (RUN/timings.json, summed over resumed calls)."""
    timings = report.get("timings") or {}
    if not timings:
        return ""
    rows = [
        [stage, duration(t["seconds"]), f"{t['peak_rss_mib']:,.0f}", str(t["calls"])]
        for stage, t in timings.items()
    ]
    total = sum(t["seconds"] for t in timings.values())
    rows.append(["total so far", duration(total), "", ""])
    return "\n\n".join([
        "## Time and memory",
        "Wall time of each stage (summed over resumed calls) and the process's peak resident "
        "memory during it; the report stage itself shows on the next `bts report`.",
        _table(["stage", "wall time", "peak RSS (MiB)", "calls"], rows),
    ])


def render_markdown(
    report: Mapping[str, Any],
    gates: Mapping[str, Any] | None = None,
    images: Mapping[str, str] | None = None,
) -> str:
    """The whole report.md text; `images` maps IMAGE_FILES keys to paths relative to it."""
    images = dict(images or {})
    parts = ["# BTS run report"]
    shows = what_it_shows(report)
    if shows:
        parts += ["## What this run shows", shows]
    parts.append(_results_section(report))
    if "loss_vs_seed" in images:
        parts += [
            "Each system's held-out loss minus the seed's, per column (blue: lower than the "
            "seed, red: higher; the lowest cell of each column boxed and bold; grey: not "
            "measured). Rows are sorted by average loss, best first.",
            f"![loss minus the seed's loss]({images['loss_vs_seed']})",
        ]
    parts.append(_repeats_section(report))
    parts.append(_removal_section(report))
    parts.append(_ablation_section(report, images))
    if "training_curves" in images:
        parts += ["## Training", f"![training curves]({images['training_curves']})"]
    parts.append(_timings_section(report))
    if gates:
        parts.append(_gate_section(gates, images))
    if report.get("config"):
        config = json.dumps(report["config"], indent=2, sort_keys=True)
        parts.append(
            f"<details><summary>Configuration</summary>\n\n```json\n{config}\n```\n\n</details>"
        )
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, so no global state and no GUI backend."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _temp_path(path: Path) -> Path:
    """A sibling temp name: the rename stays on one file system, so it is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _save(fig: Figure, path: Path) -> None:
    """Write the PNG through a temp file and a rename, so readers never see half a file."""
    path, tmp = Path(path), _temp_path(Path(path))
    try:
        with warnings.catch_warnings():
            # Tokens of other scripts may lack glyphs in the default font: drawn as boxes.
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _colors(n: int) -> list[Any]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _fmt_cell(value: float) -> str:
    """A heat-map cell: 3 decimals, signed; the seed's exact zeros plain."""
    return "0.000" if value == 0 else f"{value:+.3f}"


def _column_label(column: str) -> str:
    """A heat-map column header: the average says what it averages; long names on two lines."""
    if column == AVERAGE:
        return "average\n(of domains)"
    return column.replace("_", "\n", 1) if len(column) > 10 else column


def plot_loss_vs_seed(report: Mapping[str, Any], path: Path) -> None:
    """Heat map of each system's loss minus the seed's (rows best average first, columns the
    domains, domain_switch if measured, and the average), values printed, lowest per column
    boxed in bold, a diverging colour scale centred on 0, missing cells grey."""
    names, columns, deltas = loss_vs_seed(report)
    best = best_cells(deltas, _fmt_cell)
    n_rows, n_cols = deltas.shape
    cell = min(1.0, 8.0 / n_cols)  # inches per column: the figure stays under ~1400 px
    label = max(len(n) for n in names) * 0.075 + 0.4
    fig = _figure(min(12.5, label + cell * n_cols + 1.4), 1.3 + 0.32 * n_rows)
    ax = fig.subplots()
    finite = deltas[np.isfinite(deltas)]
    limit = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-3)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d0d0d0")
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    image = ax.imshow(np.ma.masked_invalid(deltas), cmap=cmap, norm=norm, aspect="auto")
    font = 8.5 if cell >= 0.8 else 7
    for (r, c), value in np.ndenumerate(deltas):
        if not math.isfinite(value):
            ax.text(c, r, DASH, ha="center", va="center", fontsize=font, color="#707070")
            continue
        dark = abs(value) > 0.55 * limit
        ax.text(
            c,
            r,
            _fmt_cell(value),
            ha="center",
            va="center",
            fontsize=font,
            color="white" if dark else "black",
            fontweight="bold" if best[r, c] else "normal",
        )
        if best[r, c]:
            box = Rectangle((c - 0.45, r - 0.41), 0.9, 0.82, fill=False, ec="black", lw=1.8)
            # a white halo keeps the black box visible on the darkest cells
            box.set_path_effects([Stroke(linewidth=4, foreground="white"), Normal()])
            ax.add_patch(box)
    ax.set_xticks(
        range(n_cols), [_column_label(c) for c in columns], fontsize=9 if cell >= 0.9 else 8
    )
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_rows), [f"{n} (reference)" if n == "seed" else n for n in names])
    ax.tick_params(length=0)
    # white lines between cells, thicker before the columns that are not single domains
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.axvline(len(report["domains"]) - 0.5, color="white", linewidth=4)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(image, ax=ax, label="loss − seed (nats)", shrink=min(1.0, 6 / n_rows + 0.3))
    title = (
        "Held-out loss minus the seed's: rows by average loss, best first; "
        "lowest of each column boxed (ties at 3 decimals all boxed)"
    )
    # about 14 characters per inch at 9 pt: wrap rather than run off a narrow figure
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 14)), fontsize=9)
    _save(fig, path)


@dataclass(frozen=True)
class Curve:
    """One stage's logged losses; `tokens` is cumulative, or None if the log lacks it."""

    steps: list[int]
    losses: list[float]
    tokens: list[float] | None


def load_curve(path: Path) -> Curve:
    """Step records of a metrics.jsonl (events skipped; a resumed step keeps its last record)."""
    path = Path(path)
    if not path.is_file():
        raise BtsError(f"training log {path} not found: pass the metrics.jsonl a stage wrote")
    by_step: dict[int, dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as err:
            if number == len(lines):  # a stage still running may be mid-way through a line
                break
            raise BtsError(f"{path}:{number} is not JSON ({err.msg}): fix or remove it") from err
        if "event" not in record and "step" in record and _number(record.get("loss")) is not None:
            by_step[int(record["step"])] = record
    records = [by_step[s] for s in sorted(by_step)]
    tokens = None
    if records and all(_number(r.get("tokens")) is not None for r in records):
        tokens = [float(r["tokens"]) for r in records]
        # Cumulative counts grow; per-step counts (constant or jittering) must be summed.
        cumulative = all(b >= a for a, b in zip(tokens, tokens[1:], strict=False))
        if not cumulative or (len(tokens) > 1 and tokens[-1] == tokens[0]):
            tokens = np.cumsum(tokens).tolist()
    return Curve([int(r["step"]) for r in records], [float(r["loss"]) for r in records], tokens)


def _ema(values: Sequence[float]) -> list[float]:
    """Exponential moving average over ~1/30 of the curve, to see the trend through noise."""
    keep = 1 - 2 / (len(values) / EMA_SPANS + 1)
    out: list[float] = []
    for v in values:
        out.append(v if not out else keep * out[-1] + (1 - keep) * v)
    return out


def load_curves(logs: Mapping[str, Path]) -> dict[str, Curve]:
    """The curves of the logs that hold at least one step (a stage may not have logged yet)."""
    curves = {label: load_curve(p) for label, p in logs.items()}
    return {label: c for label, c in curves.items() if c.steps}


def plot_training_curves(logs: Mapping[str, Path], path: Path) -> None:
    """Training loss per stage, one line each, against tokens seen (steps if a log lacks them)."""
    curves = load_curves(logs)
    if not curves:
        raise BtsError("no training steps in the given logs: run a stage before `bts report`")
    _plot_curves(curves, path)


def _plot_curves(curves: Mapping[str, Curve], path: Path) -> None:
    """Draw non-empty curves; the x axis is tokens only if every stage logged them."""
    use_tokens = all(c.tokens is not None for c in curves.values())
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for (label, curve), color in zip(curves.items(), _colors(len(curves)), strict=True):
        x = curve.tokens if use_tokens else curve.steps
        if len(x) >= 2 * EMA_SPANS:  # shorter curves: raw only, EMA would just lag
            ax.plot(x, curve.losses, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, _ema(curve.losses), color=color, label=label, linewidth=1.5)
        else:
            ax.plot(x, curve.losses, color=color, label=label, marker=".", linewidth=1.5)
    ax.set_xlabel("tokens seen in the stage" if use_tokens else "step")
    ax.set_ylabel("training loss (smoothed; raw faint)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _paired_ablations(report: Mapping[str, Any], curves: Mapping[str, Curve]) -> dict[str, str]:
    """Ablations that saw their stage's own batches (the mix is unchanged), so that their loss
    minus that stage's loss at the same step is a paired difference, free of batch-to-batch
    noise: ablation name -> the stage it changes."""
    changes_data = {"domains", "mix", "experts", "batch_size"}
    entries = report.get("ablations") or {}
    return {
        name: BASE_STAGES[entries[name].get("system", "bts")]
        for name in curves
        if name in entries and not changes_data & set(entries[name].get("overlay") or {})
    }


def _plot_ablation_curves(
    bases: Mapping[str, Curve], curves: Mapping[str, Curve], paired: Mapping[str, str], path: Path
) -> None:
    """Left: every ablation's training loss beside the stitch stages it changes (`bases`, by
    stage). Right: the paired difference (ablation - its stage) at each logged step, for the
    ablations that saw the same batches (`paired`: ablation name -> its base stage)."""
    fig = _figure(11, 4.2)
    left, right = fig.subplots(1, 2)
    colors = dict(zip(curves, _colors(len(curves)), strict=True))
    for (stage, base), style in zip(bases.items(), ("-", "--"), strict=False):
        left.plot(base.steps, base.losses, "k" + style, label=f"{stage} (run)", linewidth=2)
    for name, curve in curves.items():
        left.plot(curve.steps, curve.losses, color=colors[name], label=name, linewidth=1)
        if name in paired:
            base_at = dict(zip(bases[paired[name]].steps, bases[paired[name]].losses, strict=True))
            pairs = [(s, v - base_at[s]) for s, v in zip(curve.steps, curve.losses, strict=True)
                     if s in base_at]
            right.plot(*zip(*pairs, strict=True), color=colors[name], label=name, marker=".",
                       linewidth=1.2)
    right.axhline(0.0, color="black", linewidth=1)
    left.set_title("training loss")
    right.set_title("ablation - its stage, same batches (paired)")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.set_ylabel("loss")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    _save(fig, path)


def _token_label(token: str) -> str:
    """A short, visible x tick label for one token."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
    return shown if len(shown) <= MAX_TOKEN_CHARS else shown[: MAX_TOKEN_CHARS - 1] + "…"


def _plot_layer_maps(layer_mean: Mapping[str, Any], path: Path) -> None:
    """One heat map (layers x sources) per eval domain, a shared 0..1 colour scale."""
    fig = _figure(max(4.0, 2.6 * len(layer_mean)) + 1.0, 3.6)
    axes = fig.subplots(1, len(layer_mean), squeeze=False)[0]
    image = None
    for ax, (domain, entry) in zip(axes, layer_mean.items(), strict=True):
        _check_gate_entry(domain, entry, "layers")
        weights = np.asarray(entry["weights"], dtype=float)
        image = ax.imshow(weights, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(entry["sources"])), entry["sources"], rotation=45, ha="right")
        ax.set_yticks(range(len(entry["layers"])), [str(n) for n in entry["layers"]])
        ax.set_title(domain, fontsize=10)
        ax.set_ylabel("layer (stitch after block)")
        if weights.size <= 64:
            for (r, c), w in np.ndenumerate(weights):
                color = "black" if w > 0.6 else "white"
                ax.text(c, r, f"{w:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=list(axes), label="mean gate weight")
    fig.suptitle("Experts-into-hub gate weights by layer", fontsize=11)
    _save(fig, path)


def _plot_token_maps(tokens: Mapping[str, Any], path: Path, label: str = "layer") -> None:
    """Per eval domain, gates per token of one sample (sources x tokens), first MAX_TOKENS."""
    longest = max(min(len(e["tokens"]), MAX_TOKENS) for e in tokens.values())
    fig = _figure(max(6.0, 0.2 * longest + 2.0), 2.3 * len(tokens) + 0.6)
    axes = fig.subplots(len(tokens), 1, squeeze=False)[:, 0]
    image = None
    for ax, (domain, entry) in zip(axes, tokens.items(), strict=True):
        _check_gate_entry(domain, entry, "tokens")
        weights = np.asarray(entry["weights"][:MAX_TOKENS], dtype=float).T
        image = ax.imshow(weights, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        labels = [_token_label(t) for t in entry["tokens"][:MAX_TOKENS]]
        # parse_math=False: a token with '$' must not be read as mathtext.
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7, parse_math=False)
        ax.set_yticks(range(len(entry["sources"])), entry["sources"], fontsize=8)
        where = label if entry["layer"] == "output" else f"{label} {entry['layer']}"
        ax.set_title(f"{domain}: {where}, {len(labels)} tokens", fontsize=10)
    fig.colorbar(image, ax=list(axes), label="gate weight")
    _save(fig, path)


def plot_gate_maps(gates: Mapping[str, Any], path_layers: Path, path_tokens: Path) -> list[Path]:
    """Heat maps of gate weights by layer and by token; returns the files it wrote."""
    written = []
    if gates.get("layer_mean"):
        _plot_layer_maps(gates["layer_mean"], path_layers)
        written.append(Path(path_layers))
    if gates.get("tokens"):
        _plot_token_maps(gates["tokens"], path_tokens)
        written.append(Path(path_tokens))
    if gates.get("output", {}).get("tokens"):
        path_output = Path(path_tokens).with_name(IMAGE_FILES["gates_output"])
        _plot_token_maps(gates["output"]["tokens"], path_output, "output gate")
        written.append(path_output)
    return written


# ---------------------------------------------------------------- files


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from disk, or a one-line BtsError naming the file and the fix."""
    if not path.is_file():
        raise BtsError(f"{path} not found: {fix}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BtsError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): {fix}") from err
    if not isinstance(data, dict):
        raise BtsError(f"{path} must hold a JSON object: {fix}")
    return data


def _check_report(report: Mapping[str, Any], path: Path) -> None:
    """The keys the report needs, checked before anything is drawn."""
    systems, domains = report.get("systems"), report.get("domains")
    if not isinstance(systems, dict) or not isinstance(domains, list):
        raise BtsError(f"{path} needs 'systems' (object) and 'domains' (list): rerun `bts run`")
    bad = [n for n, s in systems.items() if not isinstance(s, dict)]
    if bad:
        raise BtsError(f"{path}: system '{bad[0]}' is not an object: rerun `bts run`")


def find_logs(run_dir: Path) -> dict[str, Path]:
    """Every metrics.jsonl under the run, labelled by its stage folder (e.g. experts/code).

    Stages keep their training state in RUN/train/<stage>/; that common prefix is dropped.
    """
    found = {
        p.parent.relative_to(run_dir).as_posix().removeprefix("train/"): p
        for p in Path(run_dir).rglob("metrics.jsonl")
        if p.parent != Path(run_dir)
    }
    return {label: found[label] for label in sorted(found, key=_stage_rank)}


def _stage_rank(label: str) -> tuple[int, str]:
    """Pipeline order for stage labels: seed, experts, stitch, btx, then the rest by name."""
    order = ("seed", "experts", "stitch", "btx", "ablations")
    first = label.split("/")[0]
    return (order.index(first) if first in order else len(order), label)


def write_report(run_dir: Path, logs: Mapping[str, Path] | None = None) -> Path:
    """Write report.md and its PNGs into run_dir; logs default to every metrics.jsonl there."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    report = _read_json(report_path, "run `bts report` after `bts run` has evaluated the systems")
    _check_report(report, report_path)
    gates_path = run_dir / "gates.json"
    gates = _read_json(gates_path, "rerun `bts run`") if gates_path.exists() else None
    logs = find_logs(run_dir) if logs is None else logs

    images: dict[str, str] = {}
    if "seed" in report["systems"] and report["domains"]:
        plot_loss_vs_seed(report, run_dir / IMAGE_FILES["loss_vs_seed"])
        images["loss_vs_seed"] = IMAGE_FILES["loss_vs_seed"]
    curves = load_curves(logs)
    main = {k: c for k, c in curves.items() if not k.startswith(ABLATIONS_PREFIX)}
    if main:
        _plot_curves(main, run_dir / IMAGE_FILES["training_curves"])
        images["training_curves"] = IMAGE_FILES["training_curves"]
    ablation = {
        k.removeprefix(ABLATIONS_PREFIX): c
        for k, c in curves.items()
        if k.startswith(ABLATIONS_PREFIX)
    }
    # the stages the run's ablations change (bts's stitch, bts_heads's): the plot's references
    used = {BASE_STAGES[e.get("system", "bts")] for e in (report.get("ablations") or {}).values()}
    bases = {stage: curves[stage] for stage in BASE_STAGES.values() if stage in curves and stage in used}
    if ablation and bases:
        paired = {n: s for n, s in _paired_ablations(report, ablation).items() if s in bases}
        _plot_ablation_curves(bases, ablation, paired, run_dir / IMAGE_FILES["ablation_curves"])
        images["ablation_curves"] = IMAGE_FILES["ablation_curves"]
    if gates:
        written = plot_gate_maps(
            gates, run_dir / IMAGE_FILES["gates_layers"], run_dir / IMAGE_FILES["gates_tokens"]
        )
        images |= {k: v for k, v in IMAGE_FILES.items() if run_dir / v in written}

    path = run_dir / "report.md"
    write_text(path, render_markdown(report, gates, images))
    return path
