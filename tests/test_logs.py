"""What bts writes to a log: plain progress lines, `--version`, stage results, packaged overlays."""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_model
from tqdm import tqdm
from typer.testing import CliRunner

import bts.progress as bp
from bts.cli import _timed, app
from bts.progress import LogProgress, progress, quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "bts" / "ablations"


@pytest.fixture
def log_stderr(monkeypatch):
    """stderr redirected to a file (pytest's capture is not a terminal; say so explicitly)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that advances one second each time progress reads it."""
    now = [0.0]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(bp, "_clock", tick)


def bts_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[bts]")]


def test_log_progress_is_plain_lines_at_most_every_interval(
    log_stderr, fake_clock, monkeypatch, capsys
):
    monkeypatch.setenv("BTS_PROGRESS_SECONDS", "10")
    bar = progress(total=1000, desc="seed", unit="step")
    assert isinstance(bar, LogProgress)
    with bar:
        for i in range(1000):
            bar.set_postfix(loss=f"{4 + 1 / (i + 1):.4f}", tok_s="9100", refresh=False)
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines == bts_lines(err)  # nothing but whole [bts] lines
    assert 50 <= len(lines) <= 102  # ~1000 s of fake time / 10 s, plus the final line
    assert lines[0].startswith("[bts] seed: step ") and "loss=" in lines[0] and "eta " in lines[0]
    assert lines[-1].startswith("[bts] seed: step 1000/1000 (100%), loss=4.0010, tok_s=9100")
    assert "done in" in lines[-1]


def test_log_progress_is_bounded_in_real_time(log_stderr, monkeypatch, capsys):
    monkeypatch.setenv("BTS_PROGRESS_SECONDS", "0.02")
    start = time.monotonic()
    count = 0
    for _ in progress(range(300_000), desc="loss", unit="batch"):
        count += 1
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert count == 300_000 and "\r" not in err
    assert len(lines) <= elapsed / 0.02 + 2
    assert lines[-1].startswith("[bts] loss: batch 300000/300000 (100%)")


def test_log_progress_final_line_says_where_it_stopped(log_stderr, fake_clock, capsys):
    with pytest.raises(KeyboardInterrupt), progress(total=20, desc="seed", unit="step") as bar:
        bar.update(5)
        raise KeyboardInterrupt
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("[bts] seed: step 5/20 (25%), stopped after")


def test_short_inner_loops_stay_silent_with_leave_false(log_stderr, monkeypatch, capsys):
    monkeypatch.setenv("BTS_PROGRESS_SECONDS", "30")
    assert list(progress(range(5), desc="generate", leave=False)) == list(range(5))
    assert list(progress(range(5), desc="generate", disable=True)) == list(range(5))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("BTS_PROGRESS_SECONDS", "0")  # a slow loop: its lines and a final one
    assert list(progress(range(3), desc="generate", unit="batch", leave=False)) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("[bts] generate: batch 3/3 (100%), done in")


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(total=3, desc="seed", unit="step")
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not isinstance(progress(total=3, disable=True), tqdm)


def test_training_writes_plain_progress_lines(log_stderr, monkeypatch, capsys, tmp_path):
    from ddp_worker import batches, tiny_llama

    from bts.train import TrainConfig, train

    monkeypatch.setenv("BTS_PROGRESS_SECONDS", "0")  # a line every step
    cfg = TrainConfig(steps=4, lr=1e-2, checkpoint_every=4, log_every=1)
    train(tiny_llama(), batches(), cfg, tmp_path, name="seed")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = bts_lines(err)
    assert [line.split(",")[0] for line in lines] == [
        f"[bts] seed: step {s}/4 ({25 * s}%)" for s in range(1, 5)
    ]
    assert all("loss=" in line and "tok_s=" in line for line in lines)
    assert "done in" in lines[-1]


def test_quiet_libraries_turns_off_hf_bars_in_a_log(log_stderr, monkeypatch, capsys, tmp_path):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as tlogging

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    was_on = tlogging.is_progress_bar_enabled()
    tlogging.enable_progress_bar()
    try:
        result = CliRunner().invoke(app, ["report", str(tmp_path / "no-run")])  # any command
        assert result.exit_code == 1 and "not a run directory" in result.output
        assert not tlogging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert quiet_libraries()  # what the command called first
        tiny_model("llama-untied", vocab_size=64, hidden_size=16, intermediate_size=32,
                   num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1).save_pretrained(tmp_path / "m")
        LlamaForCausalLM.from_pretrained(tmp_path / "m")
        err = capsys.readouterr().err
        assert "Writing model shards" not in err and "Loading weights" not in err
    finally:
        if was_on:
            tlogging.enable_progress_bar()


def test_version_prints_the_installed_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"bts {importlib.metadata.version('bts')}"


def test_stage_results_print_as_paths(capsys):
    paths = {"code": Path("/runs/x/branches/code"), "math": Path("/runs/x/branches/math")}
    assert _timed("branch", lambda: paths) is paths
    err = capsys.readouterr().err
    assert "PosixPath(" not in err and "{" not in err
    assert "code=/runs/x/branches/code" in err and "math=/runs/x/branches/math" in err
    _timed("seed", lambda: Path("/runs/x/seed"))
    assert capsys.readouterr().err.strip().endswith("-> /runs/x/seed")


def test_shipped_overlays_are_found_from_any_directory(tmp_path, monkeypatch):
    from bts.ablate import overlay_paths

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ROOT / "configs" / "smoke.yaml", run / "config.yaml")  # enough for --list
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    names = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    assert len(names) >= 9
    assert [p.stem for p in overlay_paths([])] == names
    assert overlay_paths(["stitches_1"])[0].is_file()
    result = CliRunner().invoke(app, ["ablate", str(run), "--list"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert listed == names


def test_eval_writes_its_records_into_the_run_directory(tmp_path, monkeypatch):
    import bts.compare
    import bts.evaluate

    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(bts.compare, "evaluate_paths", lambda run_dir, models: [])
    monkeypatch.setattr(bts.evaluate, "format_table", lambda records: "table")
    result = CliRunner().invoke(app, ["eval", str(run), str(run / "model")])
    assert result.exit_code == 0, result.output
    assert (run / "eval-models.json").is_file()
    assert list(elsewhere.iterdir()) == []
