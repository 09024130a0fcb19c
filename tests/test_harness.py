"""`bts lm-eval`: lm-evaluation-harness on an export; bts_math scores as `bts eval` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from bts import BtsError, StitchedModel
from bts.cli import app
from bts.evaluate import N_SAMPLES, math_accuracy
from bts.export import export
from bts.harness import math_task_problems, run_lm_eval
from bts.tasks import MATH_MAX_NEW_TOKENS, process_results

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")

from helpers import build_stitched  # noqa: E402  (the same tiny stitched model)

ITEMS = N_SAMPLES  # math_accuracy keeps one generation per item for this many items


@pytest.fixture(scope="module")
def stitched(tmp_path_factory) -> Path:
    return build_stitched(tmp_path_factory.mktemp("harness"))


def test_process_results_is_our_exact_match_rule():
    doc = {"answer": "42"}
    assert process_results(doc, [" 42"]) == {"exact_match": 1.0}
    assert process_results(doc, ["42 \nQuestion: 1"]) == {"exact_match": 1.0}
    assert process_results(doc, [" 421"]) == {"exact_match": 0.0}
    assert process_results(doc, [""]) == {"exact_match": 0.0}


def test_bts_math_through_the_harness_equals_math_accuracy(stitched, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    out = export(stitched, tmp_path / "hf")
    results_file = tmp_path / "results.json"
    result = CliRunner().invoke(
        app,
        [
            "lm-eval",
            str(out),
            "--tasks",
            "bts_math",
            "--limit",
            str(ITEMS),
            "--out",
            str(results_file),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "bts_math" in result.output and "exact_match" in result.output
    results = json.loads(results_file.read_text())
    samples = sorted(results["samples"]["bts_math"], key=lambda s: s["doc_id"])
    assert len(samples) == ITEMS

    # our own scoring of the same items, on the in-memory stitched model
    problems = math_task_problems()[:ITEMS]
    model = StitchedModel.from_pretrained(stitched).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = math_accuracy(
        model, tokenizer, problems, batch_size=1, max_new_tokens=MATH_MAX_NEW_TOKENS
    )

    for sample, mine, (prompt, answer) in zip(samples, ours.samples, problems, strict=True):
        assert sample["doc"] == {"prompt": prompt, "answer": answer}
        assert sample["arguments"][0][0] == prompt  # the prompt exactly, no added whitespace
        # the harness cuts at the first newline; we take the first line: same text, per item
        assert sample["resps"][0][0] == mine["generated"].split("\n", 1)[0]
        assert sample["exact_match"] == float(mine["correct"])
    accuracy = results["results"]["bts_math"]["exact_match,none"]
    assert accuracy == pytest.approx(ours.accuracy)
    assert not any((Path.home() / ".cache" / "huggingface").glob("**/bts_math*"))


def test_a_stitched_directory_runs_in_memory_and_bad_models_are_one_clear_error(
    stitched, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    results = run_lm_eval(stitched, ["bts_math"], limit=2)
    assert results["results"]["bts_math"]["exact_match,none"] >= 0.0
    assert set(results["bts_timings"]) == {"setup_s", "total_s"}
    with pytest.raises(BtsError, match="neither a model directory"):
        run_lm_eval(tmp_path, ["bts_math"])
    with pytest.raises(BtsError, match="no lm-eval tasks"):
        run_lm_eval(stitched, [])
    with pytest.raises(BtsError, match="is not a folder"):
        run_lm_eval(stitched, ["bts_math"], include_path=tmp_path / "missing")
