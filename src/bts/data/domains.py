"""Domains by name or path, and the deterministic train/held-out split by document.

A domain is a built-in name (`BUILTIN_DOMAINS`) or a local path:
- a `.txt` file: documents are separated by blank lines (one or more empty lines);
- a directory of `.txt` files (searched recursively, sorted): one document per file;
- a `.jsonl` file: one JSON object per line, the document in field `text_field`;
- a directory written by `datasets` (`save_to_disk`): every split in sorted split order,
  the document in column `text_field`.
Blank documents are dropped; a source with none left is an error.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from bts.data.sources import Document, Domain, code, french, manpages, prose
from bts.data.sources import math as math_source
from bts.errors import BtsError

BUILTIN_DOMAINS: dict[str, Callable[[], Domain]] = {
    "code": code.domain,
    "prose": prose.domain,
    "math": math_source.domain,
    "french": french.domain,
    "man": manpages.domain,  # opt-in, not a default domain: it depends on the machine
}
DEFAULT_DOMAINS = ("code", "prose", "math", "french")  # the same documents on every machine
DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")

__all__ = [
    "BUILTIN_DOMAINS",
    "DEFAULT_DOMAINS",
    "Document",
    "Domain",
    "load_domain",
    "sample_documents",
    "split_documents",
    "train_texts",
]


def load_domain(name_or_path: str, text_field: str = "text", name: str | None = None) -> Domain:
    """A built-in domain by name, or a user domain from a local file or directory (only read).

    `name` overrides a user domain's default name (its file stem or folder name).
    """
    if name_or_path in BUILTIN_DOMAINS:
        return BUILTIN_DOMAINS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise BtsError(
            f"domain '{name_or_path}' is neither a built-in ({', '.join(BUILTIN_DOMAINS)}) nor "
            "an existing path: give a built-in name or a .txt/.jsonl file or a directory"
        )
    domain = Domain(
        name=name or (path.stem if path.is_file() else path.name),
        source=str(path),
        licence="user-supplied",
        read=_reader(path, text_field),
    )
    # read it all once now, so a bad line fails here rather than halfway through packing
    if sum(1 for _ in domain.documents()) == 0:
        raise BtsError(f"domain '{path}' has no non-empty documents: add text to it")
    return domain


def _reader(path: Path, text_field: str) -> Callable[[], Iterable[Document]]:
    """The document reader for a user path, chosen by its kind."""
    if path.is_dir():
        if any((path / marker).exists() for marker in DATASETS_MARKERS):
            return lambda: _datasets_documents(path, text_field)
        return lambda: _txt_dir_documents(path)
    if path.suffix == ".txt":
        return lambda: _txt_file_documents(path)
    if path.suffix == ".jsonl":
        return lambda: _jsonl_documents(path, text_field)
    raise BtsError(
        f"unsupported domain file '{path}': use a .txt or .jsonl file, a directory of .txt "
        "files, or a directory saved by datasets"
    )


def _read_text(path: Path) -> str:
    """A file's UTF-8 text, or a BtsError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BtsError(f"cannot read '{path}': not UTF-8 ({e.reason}); convert it to UTF-8") from e
    except OSError as e:
        raise BtsError(f"cannot read '{path}': {e.strerror}; check the path and permissions") from e


def _txt_file_documents(path: Path) -> Iterator[Document]:
    """Blank-line-separated documents of one text file."""
    blocks, current = [], []
    for line in [*_read_text(path).splitlines(), ""]:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    for i, block in enumerate(blocks):
        yield Document(id=f"{path.name}/{i}", text=block)


def _txt_dir_documents(root: Path) -> Iterator[Document]:
    """One document per `.txt` file under `root`, in sorted path order."""
    for path in sorted(root.rglob("*.txt")):
        yield Document(id=path.relative_to(root).as_posix(), text=_read_text(path))


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    """One document per JSON line; blank lines are skipped."""
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BtsError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove it") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise BtsError(
                f"{path}:{lineno}: no string field '{text_field}'; add it or pass text_field"
            )
        yield Document(id=f"{path.name}/{lineno}", text=record[text_field])


def _datasets_documents(path: Path, text_field: str) -> Iterator[Document]:
    """Rows of a `datasets` directory (a Dataset, or every split of a DatasetDict)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a broken directory
        raise BtsError(f"cannot load datasets directory '{path}': {e}; re-save it") from e
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    for split in sorted(splits):
        table = splits[split]
        if text_field not in table.column_names:
            raise BtsError(
                f"datasets directory '{path}' has no column '{text_field}' "
                f"(columns: {', '.join(table.column_names)}); pass text_field"
            )
        for i, text in enumerate(table[text_field]):
            yield Document(id=f"{split}/{i}" if split else str(i), text=text or "")


def _unit_hash(seed: int, doc_id: str) -> float:
    """A number in [0, 1) fixed by (seed, id): stable across runs, unlike built-in `hash`."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    domain: Domain, seed: int, held_out_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, held_out): each document on one side, chosen by a hash of (seed, id).

    With two or more documents, each side gets at least one (the extreme hash moves over).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise BtsError(
            f"held_out_fraction is {held_out_fraction}: it must be between 0 and 1 (e.g. 0.1)"
        )
    scored = [(_unit_hash(seed, doc.id), doc) for doc in domain.documents()]
    held_out = {i for i, (u, _) in enumerate(scored) if u < held_out_fraction}
    if len(scored) >= 2 and not held_out:
        held_out = {min(range(len(scored)), key=lambda i: scored[i][0])}
    if len(scored) >= 2 and len(held_out) == len(scored):
        held_out.discard(max(range(len(scored)), key=lambda i: scored[i][0]))
    train = [doc for i, (_, doc) in enumerate(scored) if i not in held_out]
    return train, [doc for i, (_, doc) in enumerate(scored) if i in held_out]


def split_held_out(
    held_out: Sequence[Document], seed: int
) -> tuple[list[Document], list[Document]]:
    """(validation, test): each held-out document on one side, by a hash of (seed, id).

    Every choice (a learning rate, a stitch option, a default) is made on validation; the report
    scores test, so its numbers stay untuned. With one held-out document there is no validation
    side (it is all test); otherwise each side gets at least one.
    """
    scored = [(_unit_hash(seed, f"validation\0{doc.id}"), doc) for doc in held_out]
    chosen = {i for i, (u, _) in enumerate(scored) if u < 0.5}
    if len(scored) < 2:
        chosen = set()
    elif not chosen:
        chosen = {min(range(len(scored)), key=lambda i: scored[i][0])}
    elif len(chosen) == len(scored):
        chosen.discard(max(range(len(scored)), key=lambda i: scored[i][0]))
    validation = [doc for i, (_, doc) in enumerate(scored) if i in chosen]
    return validation, [doc for i, (_, doc) in enumerate(scored) if i not in chosen]


def train_texts(
    domain_names_or_paths: Iterable[str], seed: int, held_out_fraction: float, text_field="text"
) -> Iterator[str]:
    """Texts of the train splits of the given domains (what a tokenizer should be trained on)."""
    for name in domain_names_or_paths:
        train, _ = split_documents(load_domain(name, text_field), seed, held_out_fraction)
        yield from (doc.text for doc in train)


def sample_documents(name: str, n: int, seed: int) -> list[str]:
    """`n` documents of a domain picked at random (fixed by seed), in domain order."""
    docs = list(load_domain(name).documents())
    picked = sorted(random.Random(seed).sample(range(len(docs)), min(n, len(docs))))
    return [docs[i].text for i in picked]
