"""report.py: tables, deltas, gate summary and plots from made-up results in tmp_path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from bts.errors import BtsError
from bts.report import average_loss, last_layer_gates, load_curve, write_report

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
        ["domain_losses.png", "training_curves.png", "gates_layers.png", "gates_tokens.png"]
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
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) == ["domain_losses.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "domain_losses.png",
        "report.json",
        "report.md",
    ]


def test_ablation_table_deltas_switch_column_and_paired_curves(tmp_path: Path) -> None:
    systems = {
        "bts": _system([1.45, 1.70, 2.00], {}, loss_extra={"domain_switch": 2.5}),
        "btx_top2": _system([1.61, 1.83, 2.31], {}),
        "btx": {"alias_of": "btx_top2", **_system([1.61, 1.83, 2.31], {})},
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
    }
    report = {"systems": systems, "domains": DOMAINS, "ablations": ablations}
    (tmp_path / "report.json").write_text(json.dumps(report))
    _write_log(tmp_path / "train" / "stitch" / "metrics.jsonl", per_step_tokens=False)
    for name in ablations:
        _write_log(tmp_path / "train" / "ablations" / name / "metrics.jsonl", False)
    md = write_report(tmp_path).read_text()
    rows = {r["ablation"].strip("`"): r for r in _tables(md)["Ablations"]}
    assert rows["stitches_1"]["Δ avg vs bts"] == f"{(1.50 + 1.70 + 2.03 - 5.15) / 3:+.4f}"
    assert rows["general_data"]["Δ avg vs bts"] == f"{(1.40 + 1.60 + 1.90 - 5.15) / 3:+.4f}"
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
    assert _paired_ablations(report, curves) == ["stitches_1"]  # general_data saw other batches
