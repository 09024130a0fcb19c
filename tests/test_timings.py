"""Stage timings: RUN/timings.json entries, per-stage peak memory, totals, report section."""

import numpy as np
import pytest

from bts import cli
from bts.config import parse_config
from bts.report import render_markdown
from bts.stages import Run
from bts.timings import read_timings, stage_clock, stage_totals


def _touch(mib: int) -> int:
    block = np.ones(mib * 1024 * 1024 // 8)  # every page written: resident, not just reserved
    return int(block[::4096].sum())


def test_each_stage_records_its_own_peak(tmp_path):
    with stage_clock(tmp_path, "big"):
        _touch(400)
        (tmp_path / "big.out").write_text("x")
    with stage_clock(tmp_path, "small"):
        (tmp_path / "small.out").write_text("x")
    big, small = read_timings(tmp_path)
    assert (big["stage"], big["status"], small["stage"]) == ("big", "done", "small")
    # the peak is reset per stage (Linux): the small stage does not inherit the 400 MiB peak
    assert big["peak_rss_mib"] - small["peak_rss_mib"] > 300


def test_a_failed_stage_is_recorded_and_the_error_kept(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), stage_clock(tmp_path, "stitch"):
        (tmp_path / "checkpoint").mkdir()
        (tmp_path / "checkpoint" / "step-1").write_text("half way")
        raise RuntimeError("boom")
    assert [e["status"] for e in read_timings(tmp_path)] == ["failed"]


def test_a_call_that_changes_nothing_is_not_recorded(tmp_path):
    (tmp_path / "stitched").mkdir()
    (tmp_path / "stitched" / "model.safetensors").write_text("done before")
    with stage_clock(tmp_path, "stitch"):  # complete already: skipped
        pass
    with pytest.raises(ValueError), stage_clock(tmp_path, "export"):  # refused
        raise ValueError("would overwrite")
    assert not (tmp_path / "timings.json").exists()
    with stage_clock(tmp_path, "stitch"):  # a rewritten output is work
        (tmp_path / "stitched" / "model.safetensors").write_text("done again")
    assert [e["stage"] for e in read_timings(tmp_path)] == ["stitch"]


def test_no_run_directory_no_file(tmp_path):
    with stage_clock(tmp_path / "absent", "seed"):
        pass
    assert not (tmp_path / "absent").exists()


def test_resumed_calls_add_up():
    entries = [
        {"stage": "stitch", "seconds": 10.0, "peak_rss_mib": 500.0},
        {"stage": "seed", "seconds": 1.5, "peak_rss_mib": 300.0},
        {"stage": "stitch", "seconds": 2.5, "peak_rss_mib": 700.0},
    ]
    totals = stage_totals(entries)
    assert list(totals) == ["stitch", "seed"]
    assert totals["stitch"] == {"seconds": 12.5, "peak_rss_mib": 700.0, "calls": 2}


def test_cli_stages_of_a_run_are_timed_and_reported(tmp_path):
    run = Run(parse_config({}), tmp_path)
    def seed(r):
        (r.root / "seed.out").write_text("x")
        return r.root

    assert cli._timed("seed", seed, run) == tmp_path
    cli._timed("export", lambda path: (path / "export.out").write_text("x"), tmp_path)  # not a run's stage: not recorded
    assert [e["stage"] for e in read_timings(tmp_path)] == ["seed"]
    report = {"systems": {}, "domains": [], "timings": stage_totals(read_timings(tmp_path))}
    text = render_markdown(report)
    assert "## Time and memory" in text and "| seed |" in text
