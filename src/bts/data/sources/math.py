"""Built-in domain `math`: school arithmetic and algebra with exact integer answers.

Our own seeded generator (no third-party text). FIXED FORMAT, relied on by evaluation:
a problem renders as "Question: <question>\\nAnswer: <answer>\\n"; the generation prompt is
"Question: <question>\\nAnswer:" and the expected continuation is " <answer>" then a newline.
A document is 8-16 problems separated by blank lines.

Every question occurs at most once in the corpus, so a split by document gives disjoint
question sets; `math_problems` draws from a different seed stream and also excludes every
question of the built-in corpus, so evaluation problems were never trained on.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import cache

from bts.data.sources import Document, Domain

DEFAULT_DOCUMENTS = 9500
CORPUS_SEED = 0
PROBLEMS_PER_DOCUMENT = (8, 16)


@dataclass(frozen=True)
class MathProblem:
    """A question and its exact answer; `expression` evaluates to the answer, except for kind
    "linear" where it is the equation `a*x + b = c` that the answer solves."""

    question: str
    answer: str
    expression: str
    kind: str


def render(p: MathProblem) -> str:
    """The problem as it appears in training text."""
    return f"Question: {p.question}\nAnswer: {p.answer}\n"


def format_prompt(p: MathProblem) -> str:
    """The prompt for generation; the model should continue with " <answer>\\n"."""
    return f"Question: {p.question}\nAnswer:"


def expected_continuation(p: MathProblem) -> str:
    """What a perfect model generates after `format_prompt(p)`."""
    return f" {p.answer}\n"


def parse_answer(generated_text: str) -> str | None:
    """The answer in a generated continuation: its first line, stripped (None if empty)."""
    first = generated_text.split("\n", 1)[0].strip()
    return first or None


def _signed(b: int) -> str:
    """ " + 7" or " - 7", so equations read naturally."""
    return f" + {b}" if b >= 0 else f" - {-b}"


def _arithmetic(expression: str, value: int, kind: str) -> MathProblem:
    return MathProblem(f"What is {expression}?", str(value), expression, kind)


def _add(r: random.Random) -> MathProblem:
    a, b = r.randint(0, 999), r.randint(0, 999)
    return _arithmetic(f"{a} + {b}", a + b, "add")


def _subtract(r: random.Random) -> MathProblem:
    a, b = r.randint(0, 999), r.randint(0, 999)
    return _arithmetic(f"{a} - {b}", a - b, "subtract")


def _multiply(r: random.Random) -> MathProblem:
    a, b = r.randint(2, 99), r.randint(2, 999)
    return _arithmetic(f"{a} * {b}", a * b, "multiply")


def _divide(r: random.Random) -> MathProblem:
    quotient, divisor = r.randint(2, 999), r.randint(2, 49)
    return _arithmetic(f"{quotient * divisor} / {divisor}", quotient, "divide")


MULTI_STEP: list[tuple[str, Callable[[int, int, int, int], int]]] = [
    ("({a} + {b}) * {c}", lambda a, b, c, d: (a + b) * c),
    ("{a} * ({b} - {c})", lambda a, b, c, d: a * (b - c)),
    ("({a} - {b}) * {c} + {d}", lambda a, b, c, d: (a - b) * c + d),
    ("{a} + {b} * {c}", lambda a, b, c, d: a + b * c),
    ("({a} + {b}) * ({c} - {d})", lambda a, b, c, d: (a + b) * (c - d)),
    ("{a} * {b} - {c} * {d}", lambda a, b, c, d: a * b - c * d),
]


def _multi_step(r: random.Random) -> MathProblem:
    template, value = r.choice(MULTI_STEP)
    a, b, c, d = (r.randint(1, 50) for _ in range(4))
    return _arithmetic(template.format(a=a, b=b, c=c, d=d), value(a, b, c, d), "multi_step")


def _linear(r: random.Random) -> MathProblem:
    a, x, b = r.randint(2, 12), r.randint(-30, 30), r.randint(-99, 99)
    equation = f"{a}*x{_signed(b)} = {a * x + b}"
    return MathProblem(f"Solve for x: {equation}.", str(x), equation, "linear")


def _percent(r: random.Random) -> MathProblem:
    percent = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90, 120, 150])
    step = 100 // _gcd(percent, 100)  # smallest base with an integer result
    base = step * r.randint(1, 10_000 // step)
    question = f"What is {percent}% of {base}?"
    return MathProblem(question, str(percent * base // 100), f"{percent} * {base} / 100", "percent")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


KINDS: list[Callable[[random.Random], MathProblem]] = [
    _add,
    _subtract,
    _multiply,
    _divide,
    _multi_step,
    _linear,
    _percent,
]


def _generate(n: int, stream: str, exclude: Collection[str] = ()) -> list[MathProblem]:
    """`n` problems with distinct questions, none in `exclude`, from one named seed stream."""
    rng = random.Random(f"bts-math/{stream}")  # str seeds are hashed stably across runs
    seen: set[str] = set()
    problems: list[MathProblem] = []
    while len(problems) < n:
        p = rng.choice(KINDS)(rng)
        if p.question not in seen and p.question not in exclude:
            seen.add(p.question)
            problems.append(p)
    return problems


@cache
def corpus_problems(
    n_documents: int = DEFAULT_DOCUMENTS, seed: int = CORPUS_SEED
) -> tuple[tuple[MathProblem, ...], ...]:
    """The problems of each corpus document, in document order (cached: it takes ~2 s)."""
    sizes = random.Random(f"bts-math/sizes/{seed}")
    counts = [sizes.randint(*PROBLEMS_PER_DOCUMENT) for _ in range(n_documents)]
    problems = _generate(sum(counts), f"corpus/{seed}")
    grouped, offset = [], 0
    for count in counts:
        grouped.append(tuple(problems[offset : offset + count]))
        offset += count
    return tuple(grouped)


@cache
def corpus_questions() -> frozenset[str]:
    """Every question of the built-in corpus (default size and seed)."""
    return frozenset(p.question for doc in corpus_problems() for p in doc)


def math_problems(n: int, seed: int) -> list[MathProblem]:
    """`n` distinct problems for evaluation, none of which occurs in the built-in corpus."""
    return _generate(n, f"eval/{seed}", exclude=corpus_questions())


def read_corpus(n_documents: int, seed: int) -> Iterator[Document]:
    """Documents of 8-16 rendered problems separated by blank lines."""
    for i, problems in enumerate(corpus_problems(n_documents, seed)):
        yield Document(id=f"math/{i:05d}", text="\n".join(render(p) for p in problems))


def domain(n_documents: int = DEFAULT_DOCUMENTS, seed: int = CORPUS_SEED) -> Domain:
    """The `math` domain: generated problems, no third-party text."""
    return Domain(
        name="math",
        source=f"bts' seeded arithmetic/algebra generator ({n_documents} documents, seed {seed})",
        licence="generated by bts (Apache-2.0)",
        read=lambda: read_corpus(n_documents, seed),
    )
