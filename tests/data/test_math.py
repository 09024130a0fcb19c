"""The math domain: answers checked by an independent evaluator, format, disjoint held-out sets."""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

import pytest

from bts.data.domains import load_domain, split_documents
from bts.data.sources import math as m

OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def evaluate(expression: str) -> Fraction:
    """Exact value of + - * / expressions over integer literals (no eval)."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval"))


def check_answer(p: m.MathProblem) -> None:
    """Recompute the answer from the question text alone."""
    answer = int(p.answer)
    if p.kind == "linear":
        a, sign, b, c = re.fullmatch(
            r"Solve for x: (\d+)\*x ([+-]) (\d+) = (-?\d+)\.", p.question
        ).groups()
        assert int(a) * answer + (int(b) if sign == "+" else -int(b)) == int(c)
    elif p.kind == "percent":
        percent, base = re.fullmatch(r"What is (\d+)% of (\d+)\?", p.question).groups()
        assert Fraction(int(percent) * int(base), 100) == answer
    else:
        expression = re.fullmatch(r"What is (.+)\?", p.question).group(1)
        assert expression == p.expression
        assert evaluate(expression) == answer


def test_corpus_and_eval_answers_are_correct() -> None:
    corpus = [p for doc in m.corpus_problems() for p in doc]
    sample = corpus[:: max(1, len(corpus) // 4000)] + m.math_problems(500, seed=3)
    for p in sample:
        check_answer(p)
    assert {p.kind for p in sample} == {
        "add", "subtract", "multiply", "divide", "multi_step", "linear", "percent"
    }  # fmt: skip


def test_answers_are_plain_integers() -> None:
    for p in m.math_problems(300, seed=0):
        assert re.fullmatch(r"-?\d+", p.answer)


def test_format_is_fixed() -> None:
    p = m.MathProblem("What is 2 + 3?", "5", "2 + 3", "add")
    assert m.render(p) == "Question: What is 2 + 3?\nAnswer: 5\n"
    assert m.format_prompt(p) == "Question: What is 2 + 3?\nAnswer:"
    assert m.format_prompt(p) + m.expected_continuation(p) == m.render(p)


@pytest.mark.parametrize(
    ("generated", "expected"),
    [(" 42\nQuestion: What is 1 + 1?", "42"), (" -7 ", "-7"), ("", None), ("\n5", None)],
)
def test_parse_answer_takes_the_first_line(generated: str, expected: str | None) -> None:
    assert m.parse_answer(generated) == expected


def test_documents_are_rendered_problems() -> None:
    docs = list(m.read_corpus(50, seed=0))
    for doc, problems in zip(docs, m.corpus_problems(50, 0), strict=True):
        assert 8 <= len(problems) <= 16
        assert doc.text == "\n".join(m.render(p) for p in problems)


def test_corpus_questions_are_unique() -> None:
    questions = [p.question for doc in m.corpus_problems() for p in doc]
    assert len(questions) == len(set(questions))


def test_eval_problems_are_never_in_the_corpus() -> None:
    problems = m.math_problems(2000, seed=0)
    questions = {p.question for p in problems}
    assert len(questions) == 2000
    assert not questions & m.corpus_questions()
    assert m.math_problems(2000, seed=0) == problems
    assert m.math_problems(50, seed=1) != problems[:50]


def test_split_math_domain_has_disjoint_questions() -> None:
    train, held_out = split_documents(load_domain("math"), seed=0, held_out_fraction=0.1)

    def questions(docs):
        return set(re.findall(r"Question: (.*)\n", "".join(d.text for d in docs)))

    assert held_out and train
    assert not questions(train) & questions(held_out)
