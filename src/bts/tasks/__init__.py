"""Local lm-evaluation-harness tasks that score what `bts eval` scores.

`bts_math`: the held-out math questions of `bts.data.sources.math` (the items that `bts eval`
and the report score), greedy `generate_until` a newline, exact match of the first line of the
continuation, stripped: the same rule as `bts.evaluate.math_accuracy`. lm-eval resolves a task's
`data_files` against the working directory, not the YAML, so the task is written at run time
with an absolute path to its data.
"""

from __future__ import annotations

import json
from pathlib import Path

from bts.evaluate import parse_answer

MATH_TASK = "bts_math"
MATH_MAX_NEW_TOKENS = 16  # as EvalLimits.math_max_new_tokens: answers are a few tokens

_YAML = """\
# Written by bts.tasks.write_math_task; data: {data}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
process_results: !function {utils}.process_results
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_new_tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
num_fewshot: 0
metadata:
  version: 1.0
"""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: our exact-match rule (first line of the continuation, stripped)."""
    return {"exact_match": float(parse_answer(results[0]) == doc["answer"].strip())}


def write_math_task(directory: Path, problems: list[tuple[str, str]]) -> Path:
    """Write bts_math.yaml, its JSONL data and its hook module into `directory`; return it."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{MATH_TASK}.jsonl"
    rows = (json.dumps({"prompt": p, "answer": a.strip()}) for p, a in problems)
    data.write_text("\n".join(rows) + "\n")
    utils = f"{MATH_TASK}_utils"
    # lm-eval's `!function` loads a module file next to the YAML; it re-exports our hook
    (directory / f"{utils}.py").write_text("from bts.tasks import process_results  # noqa: F401\n")
    (directory / f"{MATH_TASK}.yaml").write_text(
        _YAML.format(
            task=MATH_TASK,
            data=json.dumps(str(data)),
            cache=json.dumps(str(directory / "datasets_cache")),
            utils=utils,
            max_new_tokens=MATH_MAX_NEW_TOKENS,
        )
    )
    return directory
