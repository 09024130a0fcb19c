"""Built-in domain `prose`: English technical prose written by people, not docstrings.

The same documents on every machine that installs the same packages (nothing is read from
system folders). Sources, in this order:
1. `pydoc_data.topics` (ships with CPython; PSF-2.0): the language reference and library topics
   that `help()` shows, one topic a document (about 0.47M characters).
2. The task READMEs of lm-evaluation-harness (`lm_eval/tasks/**/README.md`, MIT), pinned as a
   dependency of bts (`lm-eval==0.4.13`): benchmark descriptions and paper abstracts, one README
   a document, in sorted path order, without fenced code blocks (mostly BibTeX and shell
   commands), about 0.73M characters.
The machine's manual pages, which this domain read before, are the opt-in domain `man`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from bts.data.sources import Document, Domain, take_chars
from bts.errors import BtsError

DEFAULT_MAX_CHARS = 6_000_000
FENCED = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
MIN_README_CHARS = 200


def pydoc_documents() -> Iterator[Document]:
    """One document per `help()` topic, in sorted topic order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(id=f"pydoc/{name}", text=topics[name])


def lm_eval_root() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BtsError("built-in domain 'prose' needs lm-eval: pip install lm-eval==0.4.13")
    return Path(list(spec.submodule_search_locations)[0])


def readme_documents(root: Path) -> Iterator[Document]:
    """Each task README under `root/tasks` as prose: fenced code removed, blank runs squeezed."""
    for path in sorted((root / "tasks").rglob("README.md")):
        text = FENCED.sub("", path.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) >= MIN_README_CHARS:
            yield Document(id=f"lm_eval/{path.relative_to(root).as_posix()}", text=text)


def read_prose(max_chars: int | None, root: Path | None) -> Iterator[Document]:
    def all_docs() -> Iterator[Document]:
        yield from pydoc_documents()
        yield from readme_documents(root or lm_eval_root())

    return take_chars(all_docs(), max_chars)


def domain(max_chars: int | None = DEFAULT_MAX_CHARS, lm_eval_dir: Path | None = None) -> Domain:
    """The `prose` domain: CPython's help topics plus lm-evaluation-harness's task READMEs."""
    return Domain(
        name="prose",
        source="pydoc_data.topics (CPython) + lm_eval task READMEs (lm-eval 0.4.13)",
        licence="PSF-2.0 (pydoc topics); MIT (lm-evaluation-harness)",
        read=partial(read_prose, max_chars, lm_eval_dir),
    )
