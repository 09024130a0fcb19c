"""Atomic writes: a reader (or a re-run) sees the old output or the whole new one, never half.

Every stage output, report and record file goes through these, so a crash or Ctrl-C leaves no
half-written file or directory that a later run could mistake for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty sibling of `out_dir` that replaces `out_dir` only if the block succeeds."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise BtsError(f"{out_dir} already exists: remove it or choose another output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
