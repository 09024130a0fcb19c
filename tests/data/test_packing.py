"""Tokenizer training and packing: exact round trips, caching without re-tokenising, no partial
cache files on errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from bts.data import packing
from bts.data.packing import PackedSequences, build_corpus, pack_documents, token_dtype
from bts.data.sources import Document
from bts.data.tokenizer import EOS, load_tokenizer, train_tokenizer
from bts.errors import BtsError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Au commencement, Dieu créa les cieux et la terre.",
    "Question: What is 12 + 30?\nAnswer: 42\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"))


def make_docs(n: int = 12) -> list[Document]:
    return [Document(f"d{i}", TEXTS[i % 4] + f" number {i}" * (i % 3)) for i in range(n)]


def test_tokenizer_is_deterministic_and_loads_with_autotokenizer(tmp_path: Path) -> None:
    train_tokenizer(TEXTS, 300, tmp_path / "a")
    train_tokenizer(TEXTS, 300, tmp_path / "b")
    a, b = ((tmp_path / d / "tokenizer.json").read_text() for d in "ab")
    assert a == b
    loaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert loaded.eos_token == loaded.pad_token == loaded.bos_token == EOS
    assert loaded.convert_ids_to_tokens(loaded.eos_token_id) == EOS
    text = "Él créa 42 λ-calculi\n\ttabs"
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert load_tokenizer(tmp_path / "a").get_vocab() == loaded.get_vocab()
    assert json.loads(a)["model"]["type"] == "BPE"


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(BtsError, match="too small"):
        train_tokenizer(TEXTS, 100, tmp_path / "t")
    with pytest.raises(BtsError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_packing_round_trips(tokenizer, tmp_path: Path) -> None:
    docs = make_docs()
    packed = pack_documents(docs, tokenizer, seq_len=16, cache_dir=tmp_path)
    stream = [
        t
        for d in docs
        for t in tokenizer(d.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    usable = len(stream) // 16 * 16
    assert packed.array.dtype == np.uint16
    assert packed.array.shape == (usable // 16, 16) and len(packed) == usable // 16
    assert packed.n_tokens == usable
    assert packed.unpack().tolist() == stream[:usable]
    assert packed[1].tolist() == stream[16:32]


def test_second_call_reuses_the_cache_without_tokenising(
    tokenizer, tmp_path: Path, monkeypatch
) -> None:
    first = pack_documents(make_docs(), tokenizer, 16, tmp_path)
    mtime = first.path.stat().st_mtime_ns

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(packing, "encode_batch", no_tokenising)
    second = pack_documents(make_docs(), tokenizer, 16, tmp_path)
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.array, first.array)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_cache_key_follows_content(tokenizer, tmp_path: Path) -> None:
    base = pack_documents(make_docs(), tokenizer, 16, tmp_path).path
    edited = make_docs()
    edited[3] = Document(edited[3].id, edited[3].text + "!")
    assert pack_documents(edited, tokenizer, 16, tmp_path).path != base
    assert pack_documents(make_docs(), tokenizer, 8, tmp_path).path != base
    renamed = [Document("x" + d.id, d.text) for d in make_docs()]
    assert pack_documents(renamed, tokenizer, 16, tmp_path).path != base


def test_empty_or_too_small_corpus_leaves_no_cache(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(BtsError, match="no non-empty documents"):
        pack_documents([Document("a", "  \n")], tokenizer, 16, tmp_path / "c")
    with pytest.raises(BtsError, match="fewer than seq_len"):
        pack_documents([Document("a", "hi")], tokenizer, 64, tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_failure_while_tokenising_leaves_no_partial_file(
    tokenizer, tmp_path: Path, monkeypatch
) -> None:
    encode, calls = packing.encode_batch, []

    def fail_on_second_batch(tok, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return encode(tok, texts)

    monkeypatch.setattr(packing, "encode_batch", fail_on_second_batch)
    monkeypatch.setattr(packing, "BATCH_CHARS", 10)  # one document per batch
    with pytest.raises(RuntimeError, match="disk full"):
        pack_documents(make_docs(), tokenizer, 16, tmp_path)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_token_dtype_widens_for_large_vocabularies() -> None:
    class Vocab:
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    assert token_dtype(Vocab(65536)) == np.uint16
    assert token_dtype(Vocab(65537)) == np.uint32


def test_packed_sequences_reopen_from_path(tokenizer, tmp_path: Path) -> None:
    packed = pack_documents(make_docs(), tokenizer, 16, tmp_path)
    again = PackedSequences(packed.path)
    assert again.seq_len == 16 and np.array_equal(again.unpack(), packed.unpack())


def test_build_corpus_with_user_domains(tokenizer, tmp_path: Path) -> None:
    txt_dir = tmp_path / "notes"
    txt_dir.mkdir()
    for i in range(10):
        (txt_dir / f"{i}.txt").write_text(TEXTS[i % 4] * 3)
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": TEXTS[3] * (i + 2)}) for i in range(10)))
    corpus = build_corpus([str(txt_dir), str(jsonl)], tokenizer, 8, tmp_path / "cache", 0, 0.3)
    assert sorted(corpus) == ["notes", "qa"]
    for data in corpus.values():
        assert data.train_docs + data.validation_docs + data.held_out_docs == 10
        if data.validation is not None:  # the report's rows and the choosing rows differ
            assert data.validation.path != data.held_out.path
        assert data.train_docs >= 1 and data.held_out_docs >= 1
        assert data.train.path != data.held_out.path
        assert data.train.seq_len == data.held_out.seq_len == 8
    again = build_corpus([str(txt_dir), str(jsonl)], tokenizer, 8, tmp_path / "cache", 0, 0.3)
    assert {k: v.train.path for k, v in again.items()} == {
        k: v.train.path for k, v in corpus.items()
    }
    with pytest.raises(BtsError, match="two domains are named 'notes'"):
        build_corpus([str(txt_dir), str(txt_dir)], tokenizer, 8, tmp_path / "cache", 0, 0.3)
