"""The comparison: every system of a run evaluated on the same data, gate analysis, the report.

Systems: `seed`, `expert:<d>`, `bts`, the merges, `btm`, `expert_routing`, the `btx_*` variants
(`btx` names the config's default one), `bam`, and `bts-minus:<d>` (the stitched model with
expert d removed, no retraining). One system is loaded at a time so memory stays at one
stitched model. Writes RUN/eval.json (records), RUN/report.json, RUN/gates.json, then the
human report (RUN/report.md and PNGs, `bts.report`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from bts.arch import adapter
from bts.baselines import registry
from bts.data.sources.math import expected_continuation, format_prompt, math_problems
from bts.errors import BtsError
from bts.evaluate import EvalLimits, evaluate_models, write_records
from bts.fileio import STITCH_MANIFEST, write_json
from bts.models import load_causal_lm
from bts.progress import progress
from bts.report import attach_repeats, write_report
from bts.stages import (
    Run,
    baseline_systems,
    baselines,
    expert,
    make_seed,
    once,
    shape_difference,
    stitch,
    stitch_heads,
)
from bts.stitch import EXPERTS_INTO_HUB, OUTPUT, StitchedModel
from bts.timings import read_timings, stage_totals
from bts.train import RESULT

SystemLoader = Callable[[], torch.nn.Module]
MINUS = "bts-minus:"  # the stitched model with one expert removed
HEADS = "bts_heads"  # the stitched model with the output stitch (the experts' own heads)
HEADS_MINUS = "bts_heads-minus:"


def systems(run: Run) -> Iterator[tuple[str, SystemLoader, str | None, list[Path]]]:
    """(name, loader, training stage whose tokens/seconds it reports, the directories whose files
    make the system) for every system."""
    names, trained = run.config.expert_names, run.config.expert_domains
    seed = make_seed(run)
    experts = {d: expert(run, d) for d in names}
    yield "seed", lambda: load_causal_lm(seed), "seed", [seed]
    for d in names:  # a pretrained expert has no training stage here
        stage = f"experts/{d}" if d in trained else None
        yield f"expert:{d}", lambda d=d: load_causal_lm(experts[d]), stage, [experts[d]]
    stitched = stitch(run)
    yield "bts", lambda: StitchedModel.from_pretrained(stitched), "stitch", [stitched]
    heads = stitch_heads(run) if run.config.bts_heads is not None else None
    if heads is not None:
        yield HEADS, lambda: StitchedModel.from_pretrained(heads), "stitch_heads", [heads]
    built = baselines(run)
    for system in baseline_systems(run.config):
        if system.baseline.kind is None:  # nothing built (BTM): made from the seed and experts
            inputs = [seed, *experts.values()]
            yield system.name, lambda s=system: s.hooks.assemble(seed, experts), None, inputs
    for name, path in built.items():
        stage = _baseline_stage(run, name)
        yield name, lambda n=name, p=path: load_baseline(n, p), stage, [path]
    removable = run.config.stitched_experts
    if len(removable) > 1:
        for d in removable:
            yield f"{MINUS}{d}", lambda d=d: _without(stitched, d), None, [stitched]
        for d in removable if heads is not None else []:
            yield f"{HEADS_MINUS}{d}", lambda d=d: _without(heads, d), None, [heads]


def missing_outputs(run: Run) -> list[str]:
    """The stage outputs that `compare` needs (every one `Run.outputs` lists, but the tokenizer
    and the branches) and the run does not have yet."""
    from bts.stages import is_complete

    done = {"stitched": STITCH_MANIFEST, "routing": "bts_routing.json"}
    missing = []
    for path, kind in run.outputs().items():
        name = path.relative_to(run.root).as_posix()
        if kind == "tokenizer" or name.startswith("branches/"):
            continue
        complete = (path / done[kind]).is_file() if kind in done else is_complete(path)
        if not complete:
            missing.append(name)
    return missing


def require_complete(run: Run) -> None:
    missing = missing_outputs(run)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise BtsError(
            f"{run.root} is not complete (missing {shown}): finish it with "
            f"`bts run {run.root / 'config.yaml'} --out {run.root}` first"
        )


def _baseline_stage(run: Run, name: str) -> str | None:
    """Trained baselines keep their training state under RUN/train/<name>."""
    return name if run.path("train", name).is_dir() else None


def load_baseline(name: str, path: Path) -> torch.nn.Module:
    """Baseline system `name` from its directory, by its baseline's loader (`bts.baselines`)."""
    baseline = registry.owner(name)
    return baseline.hooks.load(path) if baseline is not None else load_causal_lm(path)


def _without(path: Path, expert: str) -> StitchedModel:
    model = StitchedModel.from_pretrained(path)
    model.remove_expert(expert)
    return model


def _limits(run: Run) -> EvalLimits:
    e = run.config.eval
    return EvalLimits(
        max_sequences=e.max_sequences,
        batch_size=e.batch_size,
        math_examples=e.math_examples,
        humaneval_problems=e.humaneval_problems,
        max_new_tokens=e.max_new_tokens,
        timeout=e.timeout,
    )


_NOTICE = (
    "[bts] eval.humaneval_pass1 is on: model-written Python runs on this machine as this user, "
    "in a time- and memory-limited child process that is not a security sandbox "
    "(docs/humaneval-safety.md)"
)


def _tasks(run: Run) -> list[str]:
    tasks = ["loss", "humaneval_loss"]
    if "math" in run.config.data.names:
        tasks.append("math")
    if run.config.eval.humaneval_pass1:
        tasks.append("humaneval_pass1")
        _notice_once()
    return tasks


@functools.cache
def _notice_once() -> None:
    print(_NOTICE, file=sys.stderr)


def _counts(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _summary(records: list[dict], model, run: Run, stage: str | None) -> dict:
    loss = {r["domain"]: r["loss"] for r in records if r["task"] == "loss"}
    loss.update({r["task"]: r["loss"] for r in records if r["task"] == "humaneval_loss"})
    accuracy = {r["task"]: r["accuracy"] for r in records if "accuracy" in r}
    total, trained = _counts(model)
    result = run.train_result(stage) if stage else None
    return {
        "loss": loss,
        "accuracy": accuracy,
        "params_total": total,
        "params_trained": trained,
        "params_active": active_parameters(model),
        "train_tokens": result.tokens if result else 0,
        "train_seconds": result.seconds if result else 0.0,
    }


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in computing one token (an MoE's unrouted experts do not)."""
    if isinstance(model, StitchedModel):
        return _stitched_active(model)
    own = getattr(model, "active_parameters", None)  # BTX and BAM's, BTM's, expert routing's
    if callable(own):
        return int(own())
    return _counts(model)[0]


def _stitched_active(model: StitchedModel) -> int:
    """Hub, stitches, and each expert's embeddings and the blocks that reach an experts-into-hub
    stitch (later expert blocks and the experts' heads never run, unless the output stitch
    mixes the experts' own heads: then all of each expert runs)."""
    count = sum(p.numel() for p in model.hub.parameters())
    count += sum(p.numel() for p in model.stitch_parameters())
    for name, constituent in model.experts.items():
        if model.output is not None:
            count += sum(p.numel() for p in constituent.parameters())
            continue
        count += constituent.get_input_embeddings().weight.numel()
        blocks = adapter(constituent, name).layers[: model.expert_depths[name]]
        count += sum(p.numel() for p in blocks.parameters())
    return count


def _trained_params(name: str, model, run: Run) -> None:
    """Constituents are loaded frozen or not; mark what the system's own stage trained."""
    system = registry.find_system(run.config.baselines, name)
    if name in ("bts", HEADS):
        model.train_only()
    elif system is not None:  # merges and btm: nothing trained
        system.hooks.trainable(model, system.spec)
    elif name == "seed" and run.config.seed_model.kind == "pretrained":
        model.requires_grad_(False)  # imported, not trained here
    elif name != "seed" and not name.startswith("expert:"):
        model.requires_grad_(False)  # bts-minus: nothing trained


SWITCH = "domain_switch"


def held_out_sets(run: Run, validation: bool = False) -> dict[str, np.ndarray]:
    """Each domain's held-out test rows (what the report scores), plus `domain_switch` when
    there are several domains; with `validation`, the validation rows instead (for choices)."""
    if validation:
        missing = [d for d, data in run.corpus.items() if data.validation is None]
        if missing:
            raise BtsError(
                f"domain(s) {', '.join(missing)} have too little held-out text for a validation "
                "split: add documents or raise data.held_out_fraction"
            )
        held = {d: data.validation.array for d, data in run.corpus.items()}
    else:
        held = {d: data.held_out.array for d, data in run.corpus.items()}
    if len(held) > 1:
        held[SWITCH] = switch_rows(held, run.config.eval.max_sequences)
    return held


def switch_rows(held: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Rows whose first half is one domain's held-out text and second half the next domain's.

    The paper shows gates following a prompt that switches domain mid-way; a system that picks
    one model per sequence (expert routing) or weighs models by the whole context (BTM) cannot
    switch as fast, and single-domain rows would never show it. Rows cycle through the domain
    pairs (code->prose, prose->math, ...), each row from distinct held-out rows.
    """
    domains = list(held)
    rows = []
    for i in range(n):
        first, second = held[domains[i % len(domains)]], held[domains[(i + 1) % len(domains)]]
        k = i // len(domains)
        a, b = first[k % len(first)], second[(k + 1) % len(second)]
        half = len(a) // 2
        rows.append(np.concatenate([a[:half], b[half:]]))
    return np.stack(rows).astype(np.int64)


def _gate_samples(run: Run) -> Iterator[tuple[str, torch.Tensor, slice, list[str]]]:
    """Per eval set: its rows, and the window of one sample shown token by token (for the
    domain-switch set, around the switch) with those tokens decoded."""
    tok, n_tokens = run.tokenizer, run.config.eval.gate_sample_tokens
    for domain, array in held_out_sets(run).items():
        rows = np.asarray(array[: run.config.eval.max_sequences]).astype(np.int64)
        start = max(0, rows.shape[1] // 2 - n_tokens // 2) if domain == SWITCH else 0
        window = slice(start, start + n_tokens)
        yield domain, torch.from_numpy(rows), window, [tok.decode([t]) for t in rows[0, window]]


def gate_analysis(run: Run, model: StitchedModel) -> dict:
    """Experts-into-hub gates per eval set: mean per layer, and per token for one sample."""
    out: dict = {"layer_mean": {}, "tokens": {}}
    model.eval()
    for domain, rows, window, tokens in _gate_samples(run):
        with torch.inference_mode():
            gates = model(rows, return_gates=True).gates
        e2h = [g for g in gates if g.kind == EXPERTS_INTO_HUB]
        out["layer_mean"][domain] = {
            "layers": [g.after_layer for g in e2h],
            "sources": e2h[-1].sources,
            "weights": [g.weights.mean(dim=(0, 1)).tolist() for g in e2h],
        }
        out["tokens"][domain] = {
            "layer": e2h[-1].after_layer,
            "sources": e2h[-1].sources,
            "tokens": tokens,
            "weights": e2h[-1].weights[0, window].tolist(),
        }
    return out


def output_gate_analysis(run: Run, model: StitchedModel) -> dict:
    """bts_heads's output gate per eval set: mean weight per source, and per token for one
    sample (gates.json["output"])."""
    out: dict = {"mean": {}, "tokens": {}}
    model.eval()
    for domain, rows, window, tokens in _gate_samples(run):
        with torch.inference_mode():
            gates = model(rows, return_gates=True).gates
        output = next(g for g in gates if g.kind == OUTPUT)
        out["mean"][domain] = {
            "sources": output.sources,
            "weights": output.weights.mean(dim=(0, 1)).tolist(),
        }
        out["tokens"][domain] = {
            "layer": "output",
            "sources": output.sources,
            "tokens": tokens,
            "weights": output.weights[0, window].tolist(),
        }
    return {"output": out}


def evaluate_system(
    run: Run, name: str, model, stage: str | None, tasks: list[str] | None = None
) -> dict:
    """Evaluate one system on the run's held-out data and tasks; its report.json entry."""
    held_out = held_out_sets(run)
    found = evaluate_models(
        {name: model},
        run.tokenizer,
        held_out,
        _math_problems(run),
        tasks or _tasks(run),
        _limits(run),
    )
    return {"records": found, **_summary(found, model, run, stage)}


def read_report(run: Run) -> dict:
    path = run.path("report.json")
    if not path.is_file():
        raise BtsError(f"{run.root} has no report.json: run `bts run` (or `bts report`) first")
    return json.loads(path.read_text())


EVAL_CACHE = "eval-cache"


def compare(run: Run) -> Path:
    """Evaluate every system on every task; write report.json, gates.json and the report.

    Each system's evaluation is cached under RUN/eval-cache, keyed by its files' SHA-256, the
    run's config and data: a re-run with nothing new evaluates nothing, and the report files
    are rewritten only if the report changed.
    """
    report: dict = {
        "systems": {},
        "domains": list(run.corpus),
        "data": {name: data.fingerprint() for name, data in run.corpus.items()},
        "config": run.config.model_dump(mode="json"),
    }
    previous_path = run.path("report.json")
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    if previous is not None and "ablations" in previous:  # `bts ablate` adds them; kept
        report["ablations"] = previous["ablations"]
    records: list[dict] = []
    gates = None
    for name, load, stage, paths in progress(list(systems(run)), desc="evaluate", unit="system"):
        entry = _cached_evaluation(run, name, load, stage, paths)
        records += entry["summary"].pop("records")
        report["systems"][name] = entry["summary"]
        if "gates" in entry:  # bts's stitch gates, bts_heads's output gate
            gates = {**(gates or {}), **entry["gates"]}
    skipped = _skipped(run)
    if skipped:
        report["skipped"] = skipped
    timings = stage_totals(read_timings(run.root))
    if timings:  # the stages timed so far (this report stage is timed once it returns)
        report["timings"] = timings
    for alias, system in registry.aliases(run.config.baselines).items():  # `btx`: the default
        if system in report["systems"]:
            report["systems"][alias] = {"alias_of": system, **report["systems"][system]}
    if previous is not None and "repeats" in previous:  # `bts repeat` adds them; kept if valid
        attach_repeats(report, previous["repeats"])
    if _same(previous, report) and run.path("report.md").is_file():
        return run.path("report.md")  # nothing changed: keep the files as they are
    write_records(records, run.path("eval.json"))
    write_json(run.path("report.json"), report)
    if gates is not None:
        write_json(run.path("gates.json"), gates)
    return write_report(run.root)


def _skipped(run: Run) -> dict[str, str]:
    """Baselines the config enables that this run could not build, with the reason."""
    reason = shape_difference(run.config)
    built = {s.name for s in baseline_systems(run.config)}
    return {
        s.name: f"{reason}: it needs every expert in the seed's shape"
        for s in registry.enabled_systems(run.config.baselines)
        if s.name not in built
    }


def _same(a: dict | None, b: dict) -> bool:
    """Equal as JSON (NaN, which some empty evaluations give, never equals itself in Python),
    stage timings aside: a re-run that evaluates nothing new keeps the report as it is."""

    def text(report: dict) -> str:
        return json.dumps({k: v for k, v in report.items() if k != "timings"}, sort_keys=True)

    return a is not None and text(a) == text(b)


def _cached_evaluation(
    run: Run, name: str, load: SystemLoader, stage: str | None, paths: list[Path]
) -> dict:
    """A system's report entry (with its records, and gates for `bts`), from the cache when
    nothing that decides it changed."""
    result = run.path("train", stage, RESULT) if stage else None
    files = [*paths, *([result] if result is not None and result.is_file() else [])]
    key = evaluation_key(run, name, files)
    cache = run.path(EVAL_CACHE, f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.json")
    if cache.is_file():
        entry = json.loads(cache.read_text())
        if entry.get("key") == key:
            return entry
    model = configure(load(), run)
    _trained_params(name, model, run)
    # a removal row is read for its losses (report: "Removing an expert"); no generation tasks
    tasks = ["loss", "humaneval_loss"] if name.startswith((MINUS, HEADS_MINUS)) else None
    summary = evaluate_system(run, name, model, stage, tasks)
    entry = {"key": key, "name": name, "summary": summary}
    if name == "bts":
        entry["gates"] = gate_analysis(run, model)
    elif name == HEADS:
        entry["gates"] = output_gate_analysis(run, model)
    once(write_json, cache, entry)
    return json.loads(json.dumps(entry))  # the same floats as a cache hit would read


def evaluation_key(run: Run, name: str, paths: list[Path]) -> str:
    """SHA-256 over what decides a system's evaluation: its name, every file of its
    directories (weights, configs, manifests), the run's config, and the data's content."""
    digest = hashlib.sha256(f"bts-eval-v2\0{name}\0".encode())  # v2: test half only
    digest.update(json.dumps(run.config.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(json.dumps({d: v.sha256 for d, v in run.corpus.items()}, sort_keys=True).encode())
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(f"{file.relative_to(path.parent)}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def configure(model: torch.nn.Module, run: Run) -> torch.nn.Module:
    """Apply the run's inference options to a stitched model (other systems are untouched)."""
    if isinstance(model, StitchedModel):
        model.set_inference(**run.config.inference.model_dump())
    return model


def load_system(path: Path) -> torch.nn.Module:
    """A stitched model directory or a plain causal LM directory."""
    if (Path(path) / STITCH_MANIFEST).is_file():
        return StitchedModel.from_pretrained(path)
    return load_causal_lm(path)


def _math_problems(run: Run) -> list[tuple[str, str]]:
    return [
        (format_prompt(p), expected_continuation(p).strip())
        for p in math_problems(run.config.eval.math_examples, run.config.seed)
    ]


def evaluate_paths(run_dir: Path, paths: list[Path]) -> list[dict]:
    """`bts eval`: models from directories, evaluated on a run's held-out data and tasks."""
    run = Run.load(run_dir)
    held_out = held_out_sets(run)
    records: list[dict] = []
    for path in paths:
        model = configure(load_system(path), run)
        records += evaluate_models(
            {str(path): model},
            run.tokenizer,
            held_out,
            _math_problems(run),
            _tasks(run),
            _limits(run),
        )
    return records
