"""report.py: tables, deltas, gate summary and plots from made-up results in tmp_path."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from bts.errors import BtsError
from bts.report import (
    ONE_RUN_NOTE,
    average_loss,
    best_cells,
    headline_table,
    last_layer_gates,
    load_curve,
    loss_vs_seed,
    plot_loss_vs_seed,
    ranked_systems,
    what_it_shows,
    write_report,
)

DOMAINS = ["code", "math", "multilingual"]
SOURCES = ["hub", "code", "math", "multilingual"]


def _system(losses: list[float], acc: dict[str, float], **extra: float) -> dict:
    return {
        "loss": dict(zip(DOMAINS, losses, strict=True)) | extra.pop("loss_extra", {}),
        "accuracy": acc,
        "params_total": 540_000_000,
        "params_trained": 9_290_000,
        "train_tokens": 1_000_000,
        "train_seconds": 123.4,
    }


# Deliberately not in reading order, so the test sees the report sort them.
SYSTEMS = {
    "btx": _system([1.61, 1.83, 2.31], {"math": 0.12, "humaneval_pass1": 0.06}),
    "bts-minus:code": _system([1.93, 1.702, 2.005], {"math": 0.15}),
    "ties": _system([1.70, 1.95, 2.40], {"math": 0.11, "humaneval_pass1": 0.07}),
    "bts": _system(
        [1.45, 1.70, 2.00],
        {"math": 0.16, "humaneval_pass1": 0.09, "mbpp": 0.2},
        loss_extra={"humaneval_loss": 0.91},
    ),
    "expert:math": _system([2.10, 1.65, 2.70], {"math": 0.17, "humaneval_pass1": 0.03}),
    "seed": _system(
        [2.00, 2.20, 2.60],
        {"math": 0.10, "humaneval_pass1": 0.05},
        loss_extra={"humaneval_loss": 1.2},
    ),
    "linear": _system([1.80, 1.90, 2.35], {"math": 0.12, "humaneval_pass1": 0.06}),
    "expert:code": _system([1.40, 2.40, 2.90], {"math": 0.08, "humaneval_pass1": 0.11}),
    "expert:multilingual": _system([2.20, 2.30, 1.95], {"math": 0.09, "humaneval_pass1": 0.04}),
    "bts-minus:math": _system([1.46, 2.15, 1.999], {"math": 0.11}),
}
ORDER = [
    "seed",
    "expert:code",
    "expert:math",
    "expert:multilingual",
    "bts",
    "linear",
    "ties",
    "btx",
]


def _gates() -> dict:
    """Gate weights where each domain's own expert dominates at the last layer (20)."""
    layer_mean, tokens = {}, {}
    for k, domain in enumerate(DOMAINS):
        last = [0.4, 0.1, 0.1, 0.1]
        last[k + 1] = 0.4
        layer_mean[domain] = {
            "layers": [5, 10, 15, 20],
            # Earlier layers favour another expert, so picking the wrong layer fails the test.
            "weights": [[0.3, 0.1, 0.1, 0.5]] * 3 + [last],
            "sources": SOURCES,
        }
        toks = ["$x$", "\n", "averyveryverylongtoken", "日本"] + [f"t{i}" for i in range(66)]
        rng = np.random.default_rng(k)
        w = rng.dirichlet(np.ones(len(SOURCES)), size=len(toks))
        tokens[domain] = {"layer": 20, "sources": SOURCES, "tokens": toks, "weights": w.tolist()}
    return {"layer_mean": layer_mean, "tokens": tokens}


def _loss(step: int) -> float:
    """A falling training loss with deterministic batch-to-batch jitter."""
    return 2.0 + 1.0 / step + 0.05 * (step * 7 % 5)


def _write_log(path: Path, per_step_tokens: bool, steps: int = 30) -> None:
    path.parent.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        tokens = 512 if per_step_tokens else 512 * step
        lines.append(
            {
                "step": step,
                "loss": _loss(step),
                "lr": 1e-4,
                "grad_norm": 1.0,
                "tokens": tokens,
                "tokens_per_s": 900.0,
                "skipped": 0,
            }
        )
        if step == 10:
            lines.append({"event": "skip", "step": 10, "reason": "grad_norm"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run directory with report.json, gates.json and three stage logs, reported once."""
    run_dir = tmp_path_factory.mktemp("run")
    report = {"systems": SYSTEMS, "domains": DOMAINS, "config": {"seed": 0, "stitch": {"k": 4}}}
    (run_dir / "report.json").write_text(json.dumps(report))
    (run_dir / "gates.json").write_text(json.dumps(_gates()))
    _write_log(run_dir / "seed" / "metrics.jsonl", per_step_tokens=False)
    _write_log(run_dir / "experts" / "code" / "metrics.jsonl", per_step_tokens=True)
    _write_log(run_dir / "stitch" / "metrics.jsonl", per_step_tokens=False, steps=200)
    path = write_report(run_dir)
    return run_dir, path.read_text()


def _tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Every pipe table, keyed by the heading above it, as a list of {header: cell} rows."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, block = "", []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if block:
            header, rows = block[0], block[2:]
            tables[heading] = [dict(zip(header, r, strict=True)) for r in rows]
            block = []
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
    return tables


def _value(cell: str) -> float:
    return float(cell.strip("*"))


def test_average_loss_is_the_mean_over_domains_only() -> None:
    system = {"loss": {"a": 1.0, "b": 2.0, "c": 4.5, "humaneval_loss": 100.0}}
    assert average_loss(system, ["a", "b", "c"]) == 2.5
    assert np.isnan(average_loss(system, ["a", "missing"]))


def test_results_table_order_bold_and_average(run: tuple[Path, str]) -> None:
    _, md = run
    rows = _tables(md)["Results"]
    assert [r["system"].strip("`") for r in rows] == ORDER
    for column in rows[0]:
        lower = column.endswith("↓")
        if not (lower or column.endswith("↑")):
            continue
        key = column[:-2].removesuffix(" loss")
        kind = "accuracy" if column.endswith("↑") else "loss"
        raw = {
            n: average_loss(SYSTEMS[n], DOMAINS) if key == "avg" else SYSTEMS[n][kind].get(key)
            for n in ORDER
        }
        raw = {n: v for n, v in raw.items() if v is not None}
        bold = [r["system"].strip("`") for r in rows if r[column].startswith("**")]
        if len(raw) < 2:  # mbpp: only bts has it, nothing to compare
            assert bold == [], column
            continue
        best = (min if lower else max)(raw, key=raw.get)
        assert bold == [best], column
        shown = [_value(r[column]) for r in rows if r[column] != "–"]
        assert _value(rows[ORDER.index(best)][column]) == (min if lower else max)(shown)
    for row in rows:
        name = row["system"].strip("`")
        mean = sum(SYSTEMS[name]["loss"][d] for d in DOMAINS) / len(DOMAINS)
        assert row["avg loss ↓"].strip("*") == f"{mean:.4f}"
    assert rows[ORDER.index("bts")]["params trained (share)"] == "9.3M (1.72%)"
    assert rows[ORDER.index("bts")]["params total"] == "540.0M"


def test_removal_tables_show_correct_deltas(run: tuple[Path, str]) -> None:
    _, md = run
    tables = _tables(md)
    for domain in ("code", "math"):
        rows = tables[f"Without `{domain}`"]
        minus = SYSTEMS[f"bts-minus:{domain}"]["loss"]
        bts, seed = SYSTEMS["bts"]["loss"], SYSTEMS["seed"]["loss"]
        assert [r["loss on"] for r in rows] == [
            f"**{d}** (removed)" if d == domain else d for d in DOMAINS
        ] + ["humaneval_loss"]
        for row in rows[: len(DOMAINS)]:
            d = row["loss on"].split("**")[-2] if "**" in row["loss on"] else row["loss on"]
            assert row["Δ vs bts"] == f"{minus[d] - bts[d]:+.4f}"
            assert row["Δ vs seed"] == f"{minus[d] - seed[d]:+.4f}"
            assert row["seed"] == f"{seed[d]:.4f}"
        # bts-minus has no humaneval_loss: shown as missing, no delta invented.
        assert rows[-1]["Δ vs bts"] == "–" and rows[-1]["bts"] == "0.9100"
    assert "Removing `code` changes its loss by +0.4800 (the seed is +0.5500 from bts)" in md


def test_gate_analysis_uses_last_layer(run: tuple[Path, str]) -> None:
    _, md = run
    rows = _tables(md)["Gate analysis"]
    assert [r["eval domain"] for r in rows] == DOMAINS
    for row in rows:
        assert row["layer"] == "20"
        assert row["dominant expert"] == f"`{row['eval domain']}`"
        assert row["hub"] == "0.400"
    layer, weights = last_layer_gates(
        {"layers": [20, 5], "sources": ["hub", "a"], "weights": [[0.9, 0.1], [0.2, 0.8]]}
    )
    assert (layer, weights) == (20, {"hub": 0.9, "a": 0.1})


def test_plots_are_valid_pngs_linked_from_the_report(run: tuple[Path, str]) -> None:
    run_dir, md = run
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(
        ["loss_vs_seed.png", "training_curves.png", "gates_layers.png", "gates_tokens.png"]
    )
    for name in linked:
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000, name
        pixels = imread(run_dir / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels[..., :3].std() > 0.05, name  # not a blank canvas
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*"))


def test_load_curve_skips_events_and_accumulates_tokens(tmp_path: Path) -> None:
    _write_log(tmp_path / "a" / "metrics.jsonl", per_step_tokens=True)
    curve = load_curve(tmp_path / "a" / "metrics.jsonl")
    assert curve.steps == list(range(1, 31))
    assert curve.tokens == [512.0 * s for s in range(1, 31)]
    assert curve.losses == [_loss(s) for s in range(1, 31)]
    # A resumed run re-logs steps 2..3: the last record of each step wins.
    log = tmp_path / "b" / "metrics.jsonl"
    log.parent.mkdir()
    records = [(1, 100, 4.0), (2, 200, 3.0), (3, 300, 2.9), (2, 200, 3.1), (3, 300, 2.8)]
    log.write_text(
        "".join(json.dumps({"step": s, "tokens": t, "loss": v}) + "\n" for s, t, v in records)
    )
    with log.open("a") as f:
        f.write('{"step": 4, "tok')  # the stage is still writing this line
    curve = load_curve(log)
    assert (curve.steps, curve.tokens, curve.losses) == (
        [1, 2, 3],
        [100, 200, 300],
        [4.0, 3.1, 2.8],
    )
    log.write_text('{"step": 1, "los\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(BtsError, match=r"metrics.jsonl:1 is not JSON"):
        load_curve(log)


def test_missing_inputs_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(BtsError) as err:
        write_report(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "report.json") in message and "bts run" in message
    assert "\n" not in message
    (tmp_path / "report.json").write_text(json.dumps({"systems": SYSTEMS, "domains": DOMAINS}))
    with pytest.raises(BtsError, match="nowhere.jsonl"):
        write_report(tmp_path, logs={"seed": tmp_path / "nowhere.jsonl"})


def test_report_without_gates_or_logs(tmp_path: Path) -> None:
    systems = {n: SYSTEMS[n] for n in ("seed", "bts")}
    (tmp_path / "report.json").write_text(json.dumps({"systems": systems, "domains": DOMAINS}))
    md = write_report(tmp_path, logs={}).read_text()
    assert "Gate analysis" not in md and "Removal experiment" not in md
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == ["loss_vs_seed.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "loss_vs_seed.png",
        "report.json",
        "report.md",
    ]


def test_ablation_table_deltas_switch_column_and_paired_curves(tmp_path: Path) -> None:
    systems = {
        "bts": _system([1.45, 1.70, 2.00], {}, loss_extra={"domain_switch": 2.5}),
        "btx_top2": _system([1.61, 1.83, 2.31], {}),
        "btx": {"alias_of": "btx_top2", **_system([1.61, 1.83, 2.31], {})},
        "bts_heads": _system([1.30, 1.60, 1.90], {}),
    }
    ablations = {
        "stitches_1": {
            "description": "one layer",
            "overlay": {"num_stitches": 1},
            **_system([1.50, 1.70, 2.03], {}, loss_extra={"domain_switch": 2.6}),
        },
        "general_data": {
            "description": "55% prose",
            "overlay": {"domains": ["code", "math"]},
            **_system([1.40, 1.60, 1.90], {}),
        },
        "bts_heads/stitches_1": {  # `bts ablate --system bts_heads`: compared with bts_heads
            "description": "one layer",
            "overlay": {"num_stitches": 1},
            "system": "bts_heads",
            **_system([1.35, 1.60, 1.90], {}),
        },
    }
    report = {"systems": systems, "domains": DOMAINS, "ablations": ablations}
    (tmp_path / "report.json").write_text(json.dumps(report))
    _write_log(tmp_path / "train" / "stitch" / "metrics.jsonl", per_step_tokens=False)
    _write_log(tmp_path / "train" / "stitch_heads" / "metrics.jsonl", per_step_tokens=False)
    for name in ablations:
        _write_log(tmp_path / "train" / "ablations" / name / "metrics.jsonl", False)
    md = write_report(tmp_path).read_text()
    rows = {r["ablation"].strip("`"): r for r in _tables(md)["Ablations"]}
    assert rows["stitches_1"]["Δ avg vs its system"] == f"{(1.50 + 1.70 + 2.03 - 5.15) / 3:+.4f}"
    assert rows["general_data"]["Δ avg vs its system"] == f"{(1.40 + 1.60 + 1.90 - 5.15) / 3:+.4f}"
    assert rows["bts_heads/stitches_1"]["Δ avg vs its system"] == f"{0.05 / 3:+.4f}"
    assert {"bts` (run config)", "bts_heads` (run config)"} <= set(rows)  # both bases shown
    assert rows["stitches_1"]["domain_switch ↓"] == "2.6000"
    assert rows["general_data"]["domain_switch ↓"] == "–"
    assert "ablation_curves.png" in md
    results = [r["system"].strip("`") for r in _tables(md)["Results"]]
    assert "btx" not in results and "btx_top2" in results  # an alias is not a second row
    assert "`btx` is `btx_top2`" in md
    from bts.report import _paired_ablations, load_curves

    curves = {
        k.removeprefix("ablations/"): c
        for k, c in load_curves(
            {
                f"ablations/{n}": tmp_path / "train" / "ablations" / n / "metrics.jsonl"
                for n in ablations
            }
        ).items()
    }
    assert _paired_ablations(report, curves) == {  # general_data saw other batches
        "stitches_1": "stitch",
        "bts_heads/stitches_1": "stitch_heads",
    }


# ---------------------------------------------------------------- heat map, headline, summary


def _entry(a: float, b: float, switch: float | None = None, **extra: object) -> dict:
    loss = {"a": a, "b": b} | ({} if switch is None else {"domain_switch": switch})
    return {"loss": loss, **extra}


def _hand_report() -> dict:
    """Averages over a, b: btm 2.065 < expert_routing 2.100 < bts 2.225 < btx_top2 2.260 <
    ties 2.300 < linear 2.350 < expert:a 2.400 < expert:b 2.440 < seed 2.500; `newcomer` has
    no `b` (no average) but the lowest `a`; bts-minus:a and the ablation are better than all
    and must be left out; `btx` is an alias."""
    systems = {
        "linear": _entry(1.85, 2.85),  # no domain_switch: a missing cell
        "newcomer": {"loss": {"a": 1.00}},
        "seed": _entry(2.00, 3.00, 2.80),
        "bts-minus:a": _entry(1.65, 2.40, 2.40),
        "ties": _entry(1.90, 2.70, 2.70),
        "expert:b": _entry(2.30, 2.58),  # ties btm on b at -0.42
        "btx": _entry(1.80, 2.72, 2.65, alias_of="btx_top2"),
        "bts": _entry(1.70, 2.75, 2.60),
        "expert_routing": _entry(1.60, 2.60, 2.55),
        "btx_top2": _entry(1.80, 2.72, 2.65),
        "expert:a": _entry(1.50, 3.30, 2.90),
        "btm": _entry(1.55, 2.58, 2.50),
    }
    ablations = {"huge": _entry(0.5, 0.5, 0.5, description="not a system")}
    return {"systems": systems, "domains": ["a", "b"], "ablations": ablations}


HAND_ORDER = [
    "btm",
    "expert_routing",
    "bts",
    "btx_top2",
    "ties",
    "linear",
    "expert:a",
    "expert:b",
    "seed",
    "newcomer",
]


def test_ranked_systems_sort_by_average_and_skip_aliases_and_removals() -> None:
    assert ranked_systems(_hand_report()) == HAND_ORDER


def test_loss_vs_seed_deltas_missing_cells_and_best_marks() -> None:
    report = _hand_report()
    rows, columns, deltas = loss_vs_seed(report)
    assert rows == HAND_ORDER and columns == ["a", "b", "domain_switch", "average"]
    systems = report["systems"]
    seed = systems["seed"]["loss"]
    for i, name in enumerate(rows):
        loss = systems[name]["loss"]
        for j, key in enumerate(columns[:3]):
            if key in loss:
                assert deltas[i, j] == pytest.approx(loss[key] - seed[key]), (name, key)
            else:
                assert np.isnan(deltas[i, j]), (name, key)
    average = dict(zip(rows, deltas[:, 3], strict=True))
    assert average["bts"] == pytest.approx(2.225 - 2.5)
    assert average["btm"] == pytest.approx(2.065 - 2.5)
    assert np.isnan(average["newcomer"])
    assert (deltas[rows.index("seed")] == 0).all()  # the reference row

    best = best_cells(deltas, lambda v: f"{v:+.3f}")
    marked = {c: [rows[i] for i in np.flatnonzero(best[:, j])] for j, c in enumerate(columns)}
    assert marked == {
        "a": ["newcomer"],  # lowest a, though it ranks last for lack of an average
        "b": ["btm", "expert:b"],  # equal at the shown precision: both marked
        "domain_switch": ["btm"],
        "average": ["btm"],
    }
    one = np.array([[math.nan], [0.5]])
    assert not best_cells(one, str).any()  # one value: nothing to compare


def test_loss_vs_seed_needs_a_seed() -> None:
    report = _hand_report()
    del report["systems"]["seed"]
    with pytest.raises(BtsError, match="no 'seed'"):
        loss_vs_seed(report)


def _table_rows(table: str) -> list[list[str]]:
    lines = table.splitlines()
    assert lines[0].split()[0] == "system" and set(lines[1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[2:]:
        if line.startswith("*"):
            break
        rows.append(line.split())
    return rows


def test_headline_table_order_values_marks_and_width() -> None:
    report = _hand_report()
    table = headline_table(report, summary=False)
    header = table.splitlines()[0].split()
    assert header == ["system", "a", "b", "domain_switch", "avg", "Δ", "seed"]
    rows = _table_rows(table)
    assert [r[0] for r in rows] == HAND_ORDER
    by_name = {r[0]: r[1:] for r in rows}
    assert by_name["bts"] == ["1.7000", "2.7500", "2.6000", "2.2250", "-0.2750"]
    assert by_name["btm"] == ["1.5500", "2.5800*", "2.5000*", "2.0650*", "-0.4350*"]
    assert by_name["expert:b"] == ["2.3000", "2.5800*", "–", "2.4400", "-0.0600"]
    assert by_name["newcomer"] == ["1.0000*", "–", "–", "–", "–"]
    assert by_name["seed"][3:] == ["2.5000", "+0.0000"]
    starred = [r[0] for r in rows if any(c.endswith("*") for c in r[1:])]
    assert starred == ["btm", "expert:b", "newcomer"]
    assert max(len(line) for line in table.splitlines()) <= 100
    assert "Lowest average" not in table

    full = headline_table(report)
    assert full.startswith(table)
    summary = " ".join(full[len(table) :].split())
    assert summary == " ".join(what_it_shows(report).replace("`", "").split())


def test_headline_table_stays_narrow_with_many_domains() -> None:
    domains = [f"domain_number_{i}" for i in range(7)]
    systems = {
        name: {"loss": {d: 2.0 + 0.01 * k + 0.001 * i for i, d in enumerate(domains)}}
        for k, name in enumerate(["seed", "bts", "expert:domain_number_0", "task_arithmetic"])
    }
    table = headline_table({"systems": systems, "domains": domains}, summary=False)
    assert max(len(line) for line in table.splitlines()) <= 100
    names = [r[0] for r in _table_rows(table)]
    assert names[:2] == ["seed", "bts"] and names[3] == "task_arithmetic"
    assert names[2].endswith("…") and "expert:domain_number_0".startswith(names[2][:-1])
    # headers too long for their column are numbered and named under the table
    assert table.splitlines()[0].split()[1:4] == ["[1]", "[2]", "[3]"]
    legend = " ".join(table.split("columns: ")[1].split())
    assert legend.startswith("[1]=domain_number_0, [2]=domain_number_1,")


def test_what_it_shows_names_best_and_best_single_model_alternative() -> None:
    text = what_it_shows(_hand_report())
    assert text.startswith("Lowest average held-out loss over the 2 domains: `btm`, 2.0650")
    # btm and expert_routing are lower but yield several models: btx_top2 is the alternative
    assert (
        "`bts` against the best single-model alternative, `btx_top2`: "
        "2.2250 vs 2.2600, lower by 0.0350 in this run." in text
    )
    assert "`bts` against the seed: 2.2250 vs 2.5000, lower by 0.2750 in this run." in text
    assert text.endswith(ONE_RUN_NOTE)
    assert "beat" not in text and "bts-minus" not in text and "huge" not in text

    report = _hand_report()
    for name in ("btm", "expert_routing", "btx_top2", "ties", "btx"):
        del report["systems"][name]
    report["systems"]["bam"] = _entry(1.65, 2.70)  # 2.175: best overall and single-model
    text = what_it_shows(report)
    assert text.startswith("Lowest average held-out loss over the 2 domains: `bam`, 2.1750")
    assert "alternative, `bam` (also the lowest overall): 2.2250 vs 2.1750, higher by 0.0500" in (
        text
    )


def test_what_it_shows_uses_seed_statistics_when_present() -> None:
    report = _hand_report()
    systems = report["systems"]
    systems["bts"] |= {"average_sd": 0.02, "seeds": [0, 1, 2]}
    systems["btx_top2"] |= {"average_sd": 0.01, "seeds": 3}
    systems["seed"] |= {"average_sd": 0.03, "seeds": 3}
    text = what_it_shows(report)
    # 0.035 apart < 2 * hypot(0.02, 0.01) = 0.0447: a tie; 0.275 > 2 * hypot(0.02, 0.03)
    assert "`btx_top2`: 2.2250 vs 2.2600, within two standard deviations (0.0447) over 3 seeds" in (
        text
    )
    assert "a tie" in text
    assert "lower by 0.2750, beyond two standard deviations (0.0721) over 3 seeds" in text
    assert ONE_RUN_NOTE not in text and "in this run" not in text


def test_what_it_shows_compares_means_over_seeds() -> None:
    report = _hand_report()
    systems = report["systems"]
    systems["bts"] |= {"average_sd": 0.01, "average_mean": 2.4000, "seeds": [0, 1, 2]}
    systems["seed"] |= {"average_sd": 0.0, "average_mean": 2.5000, "seeds": [0, 1, 2]}
    text = what_it_shows(report)
    # the run's own bts average is 2.2250; over seeds it is 2.4000, and that is what counts
    assert ("`bts` against the seed: 2.4000 vs 2.5000 (means over 3 seeds), lower by 0.1000, "
            "beyond two standard deviations (0.0200) over 3 seeds") in text


def test_heatmap_png_fits_and_shows_both_signs(tmp_path: Path) -> None:
    def report_of(n: int) -> dict:
        systems = {"seed": _entry(2.0, 3.0, 2.8)}
        for k in range(n - 1):
            shift = 0.3 * (k / max(n - 2, 1)) - 0.2  # some better, some worse than the seed
            systems[f"expert_number_{k}"] = _entry(2.0 + shift, 3.0 - shift / 2, 2.8 + shift)
        return {"systems": systems, "domains": ["a", "b"]}

    small, large = tmp_path / "small.png", tmp_path / "large.png"
    plot_loss_vs_seed(report_of(4), small)
    plot_loss_vs_seed(report_of(18), large)
    for path in (small, large):
        pixels = imread(path)[..., :3]
        assert pixels.shape[1] <= 1400
        red = pixels[..., 0] > pixels[..., 2] + 0.25
        blue = pixels[..., 2] > pixels[..., 0] + 0.25
        assert red.sum() > 500 and blue.sum() > 500, path.name  # diverging: both signs show
    assert imread(large).shape[0] > imread(small).shape[0] + 300  # one row per system
    assert not list(tmp_path.glob(".*"))


def test_report_opens_with_what_it_shows_and_links_the_heatmap(tmp_path: Path) -> None:
    report = _hand_report()
    (tmp_path / "report.json").write_text(json.dumps(report))
    md = write_report(tmp_path, logs={}).read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:2] == ["## What this run shows", "## Results"]
    assert what_it_shows(report) in md
    assert "![loss minus the seed's loss](loss_vs_seed.png)" in md
    assert imread(tmp_path / "loss_vs_seed.png").shape[0] > 200
    del report["systems"]["seed"]  # nothing to subtract: no heat map, the report still renders
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "loss_vs_seed.png").unlink()
    md = write_report(tmp_path, logs={}).read_text()
    assert "loss_vs_seed.png" not in md and not (tmp_path / "loss_vs_seed.png").exists()
    assert "## What this run shows" in md


def test_baselines_left_out_are_named_with_their_reason(tmp_path: Path) -> None:
    systems = {"bts": _system([1.45, 1.70, 2.00], {}), "btm": _system([1.40, 1.60, 1.90], {})}
    why = "expert 'wide' has hidden_size 64 against the seed's 32: it needs one shape"
    report = {"systems": systems, "domains": DOMAINS, "skipped": {"linear": why}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    md = write_report(tmp_path).read_text()
    assert f"Not run here: `linear` ({why})." in md
    assert "linear" not in {r["system"].strip("`") for r in _tables(md)["Results"]}
