"""Built-in domain `code`: the Python standard library's own `.py` files, one file a document.

Source: CPython's `Lib/` as installed with the running interpreter
(`sysconfig.get_paths()["stdlib"]`). Licence: Python Software Foundation License 2.0.
Skipped: test suites, third-party packages, generated tables (`encodings`, `_sysconfigdata*`)
and `pydoc_data` (it is the `prose` domain). Files are taken in a fixed pseudo-random order (a
hash of their path, so the cap keeps a spread of the library) until `max_chars` characters.
"""

from __future__ import annotations

import sysconfig
import tokenize
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from bts.data.sources import Document, Domain, hashed_order, take_chars

DEFAULT_MAX_CHARS = 6_000_000
SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
)


def stdlib_files(root: Path) -> list[Path]:
    """The stdlib's source files under `root` that count as code, in hashed-path order."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIPPED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        if rel.parts[0].startswith("config-") or not path.is_file():
            continue
        files.append(path)
    return sorted(files, key=lambda p: hashed_order(p.relative_to(root).as_posix()))


def read_stdlib(root: Path, max_chars: int | None) -> Iterator[Document]:
    """Documents for the stdlib files, honouring each file's declared encoding."""

    def all_docs() -> Iterator[Document]:
        for path in stdlib_files(root):
            with tokenize.open(path) as f:
                text = f.read()
            yield Document(id=f"stdlib/{path.relative_to(root).as_posix()}", text=text)

    return take_chars(all_docs(), max_chars)


def domain(max_chars: int | None = DEFAULT_MAX_CHARS) -> Domain:
    """The `code` domain: Python source written by CPython's developers."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return Domain(
        name="code",
        source=f"Python {sysconfig.get_python_version()} standard library sources ({root})",
        licence="PSF-2.0",
        read=partial(read_stdlib, root, max_chars),
    )
