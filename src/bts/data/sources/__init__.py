"""Document sources: the two types every source shares, and one module per built-in domain.

A built-in source is a module with a `domain(...) -> Domain` factory whose arguments all have
defaults; `bts.data.domains.BUILTIN_DOMAINS` registers it by name (mergekit-style plugins:
adding a domain is adding one file and one registry line).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    """One unit of text; `id` is unique within its domain and stable across runs."""

    id: str
    text: str


@dataclass(frozen=True)
class Domain:
    """A named, deterministic stream of documents plus where its text comes from."""

    name: str
    source: str
    licence: str
    read: Callable[[], Iterable[Document]]

    def documents(self) -> Iterator[Document]:
        """The domain's non-empty documents, always in the same order."""
        for doc in self.read():
            if doc.text.strip():
                yield doc


def take_chars(docs: Iterable[Document], max_chars: int | None) -> Iterator[Document]:
    """Whole documents in order until `max_chars` characters have been yielded (None: all)."""
    total = 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            return
        total += len(doc.text)
        yield doc


def hashed_order(key: str) -> str:
    """Sort key giving a fixed pseudo-random order, so a `max_chars` cap keeps a spread sample."""
    return hashlib.sha256(key.encode()).hexdigest()
