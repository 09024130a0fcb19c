"""Packing: documents -> one EOS-separated token stream -> fixed-length rows, cached on disk.

Each document's tokens are followed by the tokenizer's EOS token; the stream is cut into rows
of `seq_len` and the trailing remainder (fewer than `seq_len` tokens) is dropped. Rows are a
`.npy` file (uint16 when the vocabulary fits, else uint32) opened as a memory map, named by a
hash of the tokenizer, `seq_len` and every document's id and text: a second call with the same
inputs reads the file without tokenising. Tokens stream through a temporary file and the
finished array is renamed into place, so a failure leaves no partial cache entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from bts.data.domains import (
    DEFAULT_DOMAINS,
    Document,
    load_domain,
    split_documents,
    split_held_out,
)
from bts.data.tokenizer import tokenizer_fingerprint
from bts.errors import BtsError

FORMAT_VERSION = 1
BATCH_CHARS = 1_000_000  # characters per tokenizer call: big enough to use every core


class PackedSequences:
    """Rows of `seq_len` tokens in a memory-mapped `.npy` file (shape [n, seq_len])."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.array: np.memmap = np.load(self.path, mmap_mode="r")
        if self.array.ndim != 2:
            raise BtsError(f"'{self.path}' is not a packed [n, seq_len] array: delete it")
        self.seq_len: int = int(self.array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.array[i])

    @property
    def n_tokens(self) -> int:
        """Tokens stored (rows x seq_len; the dropped remainder is not counted)."""
        return int(self.array.size)

    def unpack(self) -> np.ndarray:
        """The flat token stream as stored: the packed stream minus its dropped remainder."""
        return np.asarray(self.array).reshape(-1)


@dataclass(frozen=True)
class DomainData:
    """A domain's packed splits: train; validation (for every choice) and held_out (the
    report's test rows), the two halves of the held-out documents."""

    name: str
    train: PackedSequences
    held_out: PackedSequences
    train_docs: int
    held_out_docs: int
    source: str = ""
    licence: str = ""
    sha256: str = ""  # content_hash of the documents and their train/held-out split
    validation: PackedSequences | None = None  # None when the held-out text is too small
    validation_docs: int = 0

    def fingerprint(self) -> dict:
        """What identifies this domain's data in a run directory and a report."""
        return {
            "sha256": self.sha256,
            "train_docs": self.train_docs,
            "held_out_docs": self.held_out_docs,
            "validation_docs": self.validation_docs,
            "source": self.source,
        }

    def summary(self) -> dict:
        """Where the text comes from and how much of it there is (`bts data list`)."""
        return {
            "domain": self.name,
            "source": self.source,
            "licence": self.licence,
            "train_docs": self.train_docs,
            "held_out_docs": self.held_out_docs,
            "train_tokens": self.train.n_tokens,
            "held_out_tokens": self.held_out.n_tokens,
            "validation_docs": self.validation_docs,
            "validation_tokens": self.validation.n_tokens if self.validation else 0,
        }


def token_dtype(tokenizer: PreTrainedTokenizerBase) -> np.dtype:
    """uint16 when every token id fits in it, else uint32."""
    return np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)


def cache_key(docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> str:
    """Content hash of everything that decides the packed array."""
    h = hashlib.sha256(f"bts-packed-v{FORMAT_VERSION}/{seq_len}/".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for doc in docs:
        text = doc.text.encode()
        h.update(f"{len(doc.id)}:{doc.id}{len(text)}:".encode())
        h.update(text)
    return h.hexdigest()


def content_hash(train: Sequence[Document], held_out: Sequence[Document]) -> str:
    """SHA-256 of a domain's documents (ids and texts) and of which side of the split each is
    on; independent of the tokenizer, so it says whether two runs read the same data."""
    h = hashlib.sha256(b"bts-domain-v1")
    for side, docs in ((b"train", train), (b"held_out", held_out)):
        h.update(side + b"\0" + str(len(docs)).encode() + b"\0")
        for doc in docs:
            text = doc.text.encode()
            h.update(f"{len(doc.id)}:{doc.id}{len(text)}:".encode())
            h.update(text)
    return h.hexdigest()


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (the fast backend's batch path if any)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batches(docs: Sequence[Document], max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts grouped into batches of about `max_chars` characters."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc.text)
        size += len(doc.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _stream_tokens(docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase, out) -> int:
    """Write every document's ids followed by EOS to `out`; return the number of tokens."""
    eos, dtype, total = tokenizer.eos_token_id, token_dtype(tokenizer), 0
    for texts in _batches(docs, BATCH_CHARS):
        chunk = np.concatenate(
            [np.array([*ids, eos], dtype=dtype) for ids in encode_batch(tokenizer, texts)]
        )
        out.write(chunk.tobytes())
        total += chunk.size
    return total


def _write_npy(raw_path: Path, dest: Path, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """Copy the first rows*cols tokens of a raw token file into `dest` as an .npy array."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(dest, "wb") as out, open(raw_path, "rb") as raw:
        np.lib.format.write_array_header_1_0(out, header)
        remaining = shape[0] * shape[1] * dtype.itemsize
        while remaining:
            block = raw.read(min(remaining, 1 << 24))
            if not block:
                raise BtsError(f"token file '{raw_path}' ended early: is the disk full?")
            out.write(block)
            remaining -= len(block)
        out.flush()
        os.fsync(out.fileno())


def pack_documents(
    docs: Iterable[Document],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str | Path,
    name: str = "documents",
) -> PackedSequences:
    """Tokenise, EOS-join and cut `docs` into rows of `seq_len`, reusing a cached result."""
    docs = [doc for doc in docs if doc.text.strip()]
    if not docs:
        raise BtsError(f"{name}: no non-empty documents to pack; add text to the corpus")
    if seq_len < 1:
        raise BtsError(f"seq_len is {seq_len}: it must be a positive number of tokens")
    if tokenizer.eos_token_id is None:
        raise BtsError("the tokenizer has no EOS token: set tokenizer.eos_token before packing")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"packed-{cache_key(docs, tokenizer, seq_len)[:32]}.npy"
    if not path.exists():
        _pack_to(path, docs, tokenizer, seq_len, name)
    return PackedSequences(path)


def _pack_to(
    path: Path, docs: list[Document], tokenizer: PreTrainedTokenizerBase, seq_len: int, name: str
) -> None:
    """Tokenise into a temporary file, then rename the finished array to `path`."""
    temps = []
    try:
        fd, raw_name = tempfile.mkstemp(dir=path.parent, prefix=".tokens-", suffix=".tmp")
        temps.append(Path(raw_name))
        with os.fdopen(fd, "wb") as raw:
            n_tokens = _stream_tokens(docs, tokenizer, raw)
        if n_tokens < seq_len:
            raise BtsError(
                f"{name}: only {n_tokens} tokens, fewer than seq_len={seq_len}; "
                "add text or lower seq_len"
            )
        fd, npy_name = tempfile.mkstemp(dir=path.parent, prefix=".packed-", suffix=".tmp")
        os.close(fd)
        temps.append(Path(npy_name))
        _write_npy(temps[0], temps[1], token_dtype(tokenizer), (n_tokens // seq_len, seq_len))
        os.chmod(temps[1], 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(temps[1], path)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def build_corpus(
    domain_names_or_paths: list[str] | dict[str, str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str | Path,
    seed: int,
    held_out_fraction: float,
    text_field: str = "text",
) -> dict[str, DomainData]:
    """Load, split and pack each domain; keys are domain names (a path's stem for files, or the
    name a `{name: source}` mapping gives)."""
    named = (
        list(domain_names_or_paths.items())
        if isinstance(domain_names_or_paths, dict)
        else [(None, spec) for spec in domain_names_or_paths]
    )
    corpus: dict[str, DomainData] = {}
    for name, spec in named:
        domain = load_domain(spec, text_field, name)
        if domain.name in corpus:
            raise BtsError(f"two domains are named '{domain.name}': rename one of the files")
        train, held_out = split_documents(domain, seed, held_out_fraction)
        validation, test = _validation_and_test(held_out, tokenizer, seq_len, seed)
        corpus[domain.name] = DomainData(
            name=domain.name,
            train=pack_documents(train, tokenizer, seq_len, cache_dir, f"{domain.name} train"),
            held_out=pack_documents(test, tokenizer, seq_len, cache_dir, f"{domain.name} held-out"),
            train_docs=len(train),
            held_out_docs=len(test),
            source=domain.source,
            licence=domain.licence,
            sha256=content_hash(train, held_out),
            validation=(
                pack_documents(
                    validation, tokenizer, seq_len, cache_dir, f"{domain.name} validation"
                )
                if validation
                else None
            ),
            validation_docs=len(validation),
        )
    return corpus


def _validation_and_test(
    held_out: list[Document], tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> tuple[list[Document], list[Document]]:
    """The held-out documents' two halves, when each holds a full row; else no validation."""
    validation, test = split_held_out(held_out, seed)
    for side in (validation, test):
        texts = [d.text for d in side if d.text.strip()]
        tokens = sum(len(ids) + 1 for ids in encode_batch(tokenizer, texts)) if texts else 0
        if tokens < seq_len:
            return [], held_out
    return validation, test


def domain_table(
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: str | Path,
    seed: int,
    held_out_fraction: float,
) -> list[dict]:
    """One row per default built-in domain: where its text comes from and how much of it there is."""
    corpus = build_corpus(
        list(DEFAULT_DOMAINS), tokenizer, seq_len, cache_dir, seed, held_out_fraction
    )
    return [data.summary() for data in corpus.values()]


__all__ = [
    "DomainData",
    "PackedSequences",
    "build_corpus",
    "cache_key",
    "content_hash",
    "domain_table",
    "encode_batch",
    "pack_documents",
    "token_dtype",
]
