"""Safe writes: atomic, never over what bts did not write, and one writer per run directory.

- Every stage output, report and record file is written under a temporary name and renamed,
  so a crash or Ctrl-C leaves no half-written file or directory that a later run could take
  for a finished one.
- An output directory is replaced only if it is empty or a complete bts output of the same
  kind (its `.bts-output` marker says which); anything else needs `force`. A target that holds
  one of the inputs, or lies inside one, is refused even with `force`.
- `lock_run` gives one process a run directory (an flock, so a dead holder releases it) and
  then removes the temporary files that killed processes left there.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bts.errors import BtsError


def write_text(path: Path, text: str) -> None:
    """Write through a temporary sibling file, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Serialise first (a failure leaves no file), then write atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


STITCH_MANIFEST = "bts_stitch.json"  # the manifest of a stitched model directory (bts.stitch_io)
OWNER = ".bts-output"  # inside every directory atomic_dir writes: the kind of output it is
# outputs written before the marker existed are recognised by their own files
LEGACY_MARKERS = {
    "model": ("bts_stage.json",),
    "tokenizer": ("bts_stage.json",),
    "stitched": (STITCH_MANIFEST,),
    "export": ("bts_export.json",),
    "routing": ("bts_routing.json",),
}


def output_kind(directory: Path) -> str | None:
    """The kind of complete bts output `directory` is, or None if bts did not write it."""
    directory = Path(directory)
    marker = directory / OWNER
    if marker.is_file():
        return marker.read_text().strip() or None
    for kind, names in LEGACY_MARKERS.items():
        if any((directory / name).is_file() for name in names):
            return kind
    return None


def check_target(out_dir: Path, inputs: Mapping[str, Path] | None = None) -> None:
    """Refuse an output that is a file, or that holds or lies inside one of `inputs`."""
    target = Path(out_dir).resolve()
    if target.exists() and not target.is_dir():
        raise BtsError(f"{out_dir} is a file, not a directory: choose another output directory")
    for role, path in (inputs or {}).items():
        path = Path(path).resolve()
        if target == path or path.is_relative_to(target) or target.is_relative_to(path):
            raise BtsError(
                f"output {out_dir} would overwrite {role} ({path}): choose a directory outside it"
            )


def check_replaceable(out_dir: Path, kind: str, force: bool | None = False) -> None:
    """An existing `out_dir` may be replaced only if empty, a bts `kind` output, or forced.

    `force=None` says the command has no --force (a run's own stage outputs).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or force or not any(out_dir.iterdir()):
        return
    found = output_kind(out_dir)
    if found != kind:
        what = f"is a bts {found} output" if found else "was not written by bts"
        fix = "move it away" if force is None else "choose another directory, or pass --force"
        raise BtsError(f"{out_dir} already exists and {what}, not a bts {kind} output: {fix}")


@contextmanager
def atomic_dir(
    out_dir: Path,
    kind: str,
    *,
    overwrite: bool = True,
    force: bool = False,
    inputs: Mapping[str, Path] | None = None,
) -> Iterator[Path]:
    """Yield an empty sibling of `out_dir` that replaces `out_dir` only if the block succeeds.

    Without `overwrite` a non-empty `out_dir` is refused; with it, only one that
    `check_replaceable` allows is replaced. `inputs` (role -> path) are never overwritten.
    """
    out_dir = Path(out_dir).resolve()
    check_target(out_dir, inputs)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BtsError(f"{out_dir} already exists: remove it or choose another output directory")
    check_replaceable(out_dir, kind, bool(force))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
        (tmp / OWNER).write_text(kind + "\n")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: Path) -> None:
    """Fail now, with one line, if a file could not be written at `path` later."""
    path = Path(path)
    if path.is_dir():
        raise BtsError(f"{path} is a directory: give a file name for the output")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".bts-probe-")
    except OSError as err:
        raise BtsError(
            f"cannot write {path} ({err.strerror}): choose a writable location"
        ) from err
    os.close(fd)
    os.unlink(probe)


# --- temporary directories outside a run -----------------------------------------------------


@contextmanager
def process_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary directory named after this process, removed on the way out; those that a
    killed process (kill -9 skips every clean-up) left behind are removed first."""
    remove_dead_tempdirs(prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_dead_tempdirs(prefix: str) -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = path.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# --- one writer per run directory -------------------------------------------------------------

LOCK = ".bts.lock"
_HELD: dict[Path, int] = {}  # run directories this process holds (re-entrant within it)
# names of bts's own temporary files and directories (fileio, packing, train, report)
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-[^/]+$|^\.(tokens|packed|bts-probe)-.+$|^\..+\.tmp$|.+\.tmp-\d+$")


def lock_run(root: Path) -> None:
    """Hold `root` for this process until it exits; refuse if another live process holds it.

    The lock is an flock on RUN/.bts.lock, which the kernel releases when its holder dies (even
    by kill -9), so a stale lock file is simply taken over. Under a multi-process launch only
    rank 0 takes it: the other ranks are the same writer.
    """
    root = Path(root).resolve()
    if root in _HELD or int(os.environ.get("RANK", "0") or 0) != 0:
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise BtsError(
            f"{root} is in use by another bts process ({_describe_holder(holder)}): wait for it "
            "to finish or stop it, or use another run directory"
        ) from None
    os.ftruncate(fd, 0)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[root] = fd
    remove_stale_temps(root)


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "unknown pid"


def unlock_run(root: Path) -> None:
    fd = _HELD.pop(Path(root).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete bts temporaries under `root`; only safe while holding its lock."""
    removed = []
    for path in _temp_paths(Path(root)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _temp_paths(root: Path) -> Iterable[Path]:
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if _TEMP_NAME.match(name):
                yield Path(folder) / name
        dirs[:] = [d for d in dirs if not _TEMP_NAME.match(d)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
