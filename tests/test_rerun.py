"""Whole-pipeline runs in a subprocess: readable logs, kill -9 anywhere then a plain re-run gives
the uninterrupted run's report exactly, and a finished run re-runs without evaluating again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bts.cli import app

pytestmark = pytest.mark.slow  # the whole pipeline (minutes)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
BTS = [sys.executable, "-m", "bts.cli"]


def run_bts(out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BTS_PROGRESS_SECONDS": "30"}
    with open(log, "ab") as stream:
        return subprocess.Popen(
            [*BTS, "run", str(SMOKE), "--out", str(out)],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=out.parent,
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted smoke run, its output and log written to a file (not a terminal)."""
    folder = tmp_path_factory.mktemp("reference")
    out, log = folder / "run", folder / "run.log"
    proc = run_bts(out, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return out, log


def losses(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    return {name: entry["loss"] for name, entry in report["systems"].items()}


def test_the_log_of_a_run_is_short_and_has_no_carriage_returns(reference):
    _, log = reference
    text = log.read_bytes()
    assert b"\r" not in text
    assert len(text.splitlines()) <= 200, text.decode()[-3000:]


KillPoint = tuple[str, Callable[[Path], bool]]
KILL_POINTS: list[KillPoint] = [
    ("seed training", lambda r: (r / "train" / "seed" / "metrics.jsonl").is_file()),
    ("expert training", lambda r: (r / "train" / "experts" / "math" / "metrics.jsonl").is_file()),
    ("stitch training", lambda r: (r / "train" / "stitch" / "metrics.jsonl").is_file()),
    ("baseline training", lambda r: (r / "train" / "bam" / "metrics.jsonl").is_file()),
    ("evaluation", lambda r: len(list((r / "eval-cache").glob("*.json"))) >= 3),
    ("report writing", lambda r: (r / "report.json").is_file()),
]


def test_kill_nine_anywhere_then_a_plain_rerun_equals_the_uninterrupted_run(reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    landed = []
    for what, reached in KILL_POINTS:
        proc = run_bts(out, log)
        while proc.poll() is None and not reached(out):
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed.append(what)
        proc.wait(timeout=900)
    assert len(landed) >= 4, landed  # most points were reached while the run was alive
    proc = run_bts(out, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert losses(out) == losses(reference[0])
    assert not list(out.rglob("*.tmp-*")) and not list(out.rglob(".*.tmp"))


def test_a_finished_run_reruns_without_evaluating_or_rewriting(reference, monkeypatch):
    run, _ = reference
    import bts.compare

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr(bts.compare, "evaluate_system", no_evaluation)
    def outputs() -> dict[str, int]:  # the lock file records each new holder; not an output
        return {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()
                and p.name != ".bts.lock"}

    before = outputs()
    result = CliRunner().invoke(app, ["run", str(SMOKE), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert outputs() == before  # report.json, report.md, eval.json, gates.json untouched


def test_a_changed_system_is_evaluated_again(reference, tmp_path, monkeypatch):
    import shutil

    import bts.compare

    run = tmp_path / "copy"
    shutil.copytree(reference[0], run)
    evaluated = []
    real = bts.compare.evaluate_system

    def counting(run_, name, *args, **kwargs):
        evaluated.append(name)
        return real(run_, name, *args, **kwargs)

    monkeypatch.setattr(bts.compare, "evaluate_system", counting)
    marker = run / "baselines" / "linear" / "config.json"
    config = json.loads(marker.read_text())
    config["bts_note"] = "edited"  # any change to a system's files
    marker.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert evaluated == ["linear"]


def test_a_run_whose_data_changed_is_refused(reference, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference[0], run)
    record = json.loads((run / "data.json").read_text())
    record["math"]["sha256"] = "0" * 64
    (run / "data.json").write_text(json.dumps(record))
    result = CliRunner().invoke(app, ["run", str(SMOKE), "--out", str(run)])
    assert result.exit_code == 1
    assert "the data of domain 'math' changed since this run began" in result.output
