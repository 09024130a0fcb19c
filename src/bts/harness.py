"""`bts lm-eval`: run EleutherAI's lm-evaluation-harness on a model directory.

A thin wrapper over `lm_eval.simple_evaluate(model="hf", ...)` that (1) adds our local task
`bts_math` (bts.tasks), (2) keeps lm-eval's caches out of the user's home (HF_HOME defaults to
./.cache/huggingface) and offline, and (3) accepts a `bts export` directory, any Hugging Face
causal-LM directory, or a stitched directory (wrapped in memory, no export needed).

An export does not need `trust_remote_code`: importing `bts` registers its classes with the Auto
classes. `trust_remote_code=True` is for other custom models; it copies their code into
HF_HOME/modules.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bts.errors import BtsError
from bts.fileio import STITCH_MANIFEST, process_tempdir, write_text

DEFAULT_MATH_EXAMPLES = 200  # EvalLimits.math_examples: what `bts eval` scores by default
DEFAULT_SEED = 0  # the seed of every shipped config


def math_task_problems(n: int = DEFAULT_MATH_EXAMPLES, seed: int = DEFAULT_SEED):
    """The (prompt, answer) pairs that `bts eval` scores for a run with this seed and count."""
    from bts.data.sources.math import expected_continuation, format_prompt, math_problems

    return [(format_prompt(p), expected_continuation(p).strip()) for p in math_problems(n, seed)]


def _model_kind(model: Path) -> str:
    if (model / STITCH_MANIFEST).is_file():
        return "stitched"
    if (model / "config.json").is_file():
        return "hf"
    raise BtsError(
        f"{model} is neither a model directory (config.json) nor a stitched model "
        "(bts_stitch.json): give a `bts export` output or a saved causal LM"
    )


def _environment(hf_home: Path) -> None:
    """Offline, and caches under `hf_home` unless the user chose HF_HOME already."""
    os.environ.setdefault("HF_HOME", str(Path(hf_home).resolve()))
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(flag, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _task_manager(tasks: list[str], include_paths: list[Path]):
    """Index only our task folders when they hold every task; lm-eval's ~200 built-in task
    folders take seconds to scan, so they are added only when a task is not found locally."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=[str(p) for p in include_paths])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BtsError(
            f"unknown lm-eval tasks {unknown}: use bts_math, a built-in lm-eval task, or a task "
            "of a folder given with --include-path"
        )
    return manager


def _lm(model: Path, kind: str, batch_size: int, device: str, trust_remote_code: bool):
    """lm-eval's `hf` model: by name for a directory, or an in-memory wrapper for stitched."""
    if kind == "hf":
        args = f"pretrained={model},dtype=float32,backend=causal"
        return "hf", args + (",trust_remote_code=True" if trust_remote_code else "")
    from lm_eval.models.huggingface import HFLM

    from bts.export import hub_directory, load_tokenizer
    from bts.hf import BtsStitchedForCausalLM
    from bts.stitch import StitchedModel

    wrapper = BtsStitchedForCausalLM.from_stitched(StitchedModel.from_pretrained(model))
    tokenizer = load_tokenizer(hub_directory(model))
    lm = HFLM(
        pretrained=wrapper,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        device=device,
    )
    return lm, None


def run_lm_eval(
    model: str | Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    out: str | Path | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    hf_home: str | Path | None = None,
    trust_remote_code: bool = False,
    math_examples: int = DEFAULT_MATH_EXAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Evaluate `model` on lm-eval `tasks`; return lm-eval's results (samples included).

    `out` gets the results as JSON (written atomically). `bts_math` uses the first
    `math_examples` held-out questions for `seed`, as `bts eval` on a run with that seed.
    """
    model = Path(model)
    if not tasks:
        raise BtsError("no lm-eval tasks given: pass --tasks, e.g. --tasks bts_math")
    kind = _model_kind(model)
    if include_path is not None and not Path(include_path).is_dir():
        raise BtsError(
            f"--include-path {include_path} is not a folder: give a folder of task YAMLs"
        )
    _environment(Path(hf_home) if hf_home else Path.cwd() / ".cache" / "huggingface")
    start = time.perf_counter()
    from lm_eval import simple_evaluate

    with process_tempdir("bts-lm-eval-") as workdir:
        include = [Path(include_path).resolve()] if include_path else []
        if "bts_math" in tasks:
            from bts.tasks import write_math_task

            include.append(write_math_task(Path(workdir), math_task_problems(math_examples, seed)))
        manager = _task_manager(tasks, include)
        lm, model_args = _lm(model, kind, batch_size, device, trust_remote_code)
        setup = time.perf_counter() - start  # imports, task files, task index
        results = simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=tasks,
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=manager,
            log_samples=True,
        )
    if results is None:  # only on non-zero ranks of a distributed launch
        return {}
    results["bts_timings"] = {"setup_s": setup, "total_s": time.perf_counter() - start}
    if out is not None:
        write_text(Path(out), to_json(results))
    return results


def to_json(results: dict) -> str:
    """lm-eval's results as JSON (it holds dtypes, numpy scalars and other non-JSON values)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def summary_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)
