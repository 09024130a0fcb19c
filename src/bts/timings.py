"""Wall time and peak memory of each stage of a run, kept in RUN/timings.json for the report.

A stage that is interrupted and resumed is timed once per call; the report adds the calls up, so
a resumed run still shows what the stage cost in all. A call that changed nothing in the run (a
stage already complete, an input refused) is not a cost of the run and is not recorded, so
re-running a finished run rewrites no file. Peak memory is the process's peak resident
set size during the stage: Linux lets a process reset its own peak (`/proc/self/clear_refs`, "5")
and read it back (`VmHWM` in `/proc/self/status`); elsewhere the peak since the process started.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bts.fileio import write_json

TIMINGS_FILE = "timings.json"
_STATUS = Path("/proc/self/status")
_NOT_WORK = {TIMINGS_FILE, ".bts.lock"}  # the lock records each holder, including a no-op call


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the run with its size and modification time: a stat each, no reading."""
    if not root.is_dir():
        return {}
    state = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel not in _NOT_WORK and path.is_file():
            stat = path.stat()
            state[rel] = (stat.st_size, stat.st_mtime_ns)
    return state


def _reset_peak() -> bool:
    """Start a new peak-RSS window; False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_mib(reset_worked: bool) -> float:
    if reset_worked:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS


def read_timings(root: Path) -> list[dict]:
    path = Path(root) / TIMINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


@contextmanager
def stage_clock(root: Path, stage: str) -> Iterator[None]:
    """Time `stage` and append its wall seconds and peak memory to RUN/timings.json, also when
    it fails (an interrupted stage's time still counts towards the run), but only if the call
    changed the run."""
    root = Path(root)
    before = _tree_state(root)
    reset = _reset_peak()
    start = time.perf_counter()
    status = "failed"
    try:
        yield
        status = "done"
    finally:
        entry = {
            "stage": stage,
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(_peak_mib(reset), 1),
            "status": status,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if _tree_state(root) != before:
            write_json(root / TIMINGS_FILE, [*read_timings(root), entry])


def stage_totals(entries: list[dict]) -> dict[str, dict]:
    """Per stage, in first-seen order: summed seconds over its calls, the largest peak, calls."""
    totals: dict[str, dict] = {}
    for e in entries:
        t = totals.setdefault(e["stage"], {"seconds": 0.0, "peak_rss_mib": 0.0, "calls": 0})
        t["seconds"] = round(t["seconds"] + e["seconds"], 1)
        t["peak_rss_mib"] = max(t["peak_rss_mib"], e["peak_rss_mib"])
        t["calls"] += 1
    return totals
