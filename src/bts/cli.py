"""The `bts` command line: each command parses its arguments and calls one function.

Every stage command takes the run's config and its run directory (`--out`); a stage whose output
is complete is skipped, an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from bts.errors import BtsError
from bts.progress import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Inspect the built-in and configured domains.")
app.add_typer(data_app, name="data")

Config = Annotated[Path, typer.Argument(help="Run config (YAML), e.g. configs/demo.yaml")]
Out = Annotated[
    Path | None,
    typer.Option(
        "--out", help="Run directory (default: RUN for RUN/config.yaml, else runs/<config name>)"
    ),
]
RunDir = Annotated[Path, typer.Argument(help="A run directory made by `bts run`")]
Force = Annotated[
    bool, typer.Option("--force", help="Replace an existing output that bts did not write")
]


def _friendly(fn):
    """Bad input is one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        quiet_libraries()  # no third-party bars in a log; plain bts progress lines instead
        try:
            return fn(*args, **kwargs)
        except BtsError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except OSError as err:  # a full disk, a read-only folder, a path that is a file
            where = f" {err.filename}" if err.filename else ""
            typer.echo(
                f"error: cannot use{where}: {err.strerror or err}; check the path, its "
                "permissions and free space",
                err=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _open(config: Path, out: Path | None):
    from bts.config import load_config
    from bts.stages import Run

    cfg = load_config(config)
    return Run.open(cfg, out or default_out(config))


def default_out(config: Path) -> Path:
    """A run's own config.yaml re-runs that run; any other config runs into runs/<name>."""
    run_markers = (".bts.lock", "seed", "tokenizer")  # a run made by an older bts has no lock
    if config.name == "config.yaml" and any((config.parent / m).exists() for m in run_markers):
        return config.parent
    return Path("runs") / config.stem


def _shown(result) -> str:
    """A stage's result for a log: a path as its string, a dict of paths one `name=path` a line."""
    if isinstance(result, dict) and result:
        return "".join(f"\n    {name}={value}" for name, value in result.items())
    return str(result)


def _timed(label: str, fn, *args):
    """Run one stage; a stage of a run (first argument a Run) is also kept in RUN/timings.json."""
    from bts.timings import stage_clock

    stages = sys.modules.get("bts.stages")  # a Run exists only once bts.stages is imported
    root = args[0].root if stages and args and isinstance(args[0], stages.Run) else None
    start = time.perf_counter()
    with stage_clock(root, label) if root is not None else contextlib.nullcontext():
        result = fn(*args)
    elapsed = time.perf_counter() - start
    typer.echo(f"[bts] {label}: done in {elapsed:.1f} s -> {_shown(result)}", err=True)
    return result


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"bts {version('bts')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the bts version and exit"
        ),
    ] = False,
) -> None:
    """Options of `bts` itself, before a command (the app's help is the module docstring's)."""


def _headline(run_dir: Path) -> None:
    """The results at a glance on stdout; report.md has the rest."""
    import json

    from bts.report import headline_table

    report = json.loads((run_dir / "report.json").read_text())
    typer.echo(headline_table(report))
    typer.echo(f"(full report: {run_dir / 'report.md'})")


@app.command()
@_friendly
def run(config: Config, out: Out = None) -> None:
    """Run every stage: seed, branch, experts, stitch, baselines, report."""
    from bts import stages
    from bts.compare import compare

    r = _open(config, out)
    _timed("seed", stages.make_seed, r)
    _timed("branch", stages.branch, r)
    for domain in r.config.expert_domains:
        _timed(f"expert {domain}", stages.train_expert, r, domain)
    for name in r.config.experts.pretrained:  # checked against the seed, never trained
        _timed(f"expert {name} (pretrained)", stages.import_expert, r, name)
    _timed("stitch", stages.stitch, r)
    if r.config.bts_heads is not None:
        _timed("stitch heads", stages.stitch_heads, r)
    _timed("baselines", stages.baselines, r)
    _timed("report", compare, r)
    _headline(r.root)


@app.command()
@_friendly
def seed(config: Config, out: Out = None) -> None:
    """Pretrain the tiny seed, or import a pretrained one (directory or GGUF)."""
    from bts.stages import make_seed

    _timed("seed", make_seed, _open(config, out))


@app.command()
@_friendly
def branch(config: Config, out: Out = None) -> None:
    """Copy the seed into one branch per expert domain."""
    from bts.stages import branch as branch_stage

    _timed("branch", branch_stage, _open(config, out))


@app.command("train-expert")
@_friendly
def train_expert(
    config: Config,
    domain: Annotated[str, typer.Argument(help="Expert domain to train")],
    out: Out = None,
) -> None:
    """Continue pretraining one branch on its domain (experts can train on separate machines)."""
    from bts.stages import train_expert as stage

    _timed(f"expert {domain}", stage, _open(config, out), domain)


@app.command()
@_friendly
def stitch(config: Config, out: Out = None) -> None:
    """Freeze seed and experts and train only the stitch layers."""
    from bts.stages import stitch as stage

    _timed("stitch", stage, _open(config, out))


@app.command()
@_friendly
def baselines(config: Config, out: Out = None) -> None:
    """Build the merges (mergekit) and BTX from the same seed and experts."""
    from bts.stages import baselines as stage

    _timed("baselines", stage, _open(config, out))


@app.command()
@_friendly
def report(run_dir: RunDir) -> None:
    """Evaluate every system of a run and write report.json, report.md and plots."""
    from bts.compare import compare, require_complete
    from bts.stages import Run

    run = Run.load(run_dir)
    require_complete(run)  # `bts report` evaluates; it never trains a missing stage
    _timed("report", compare, run)
    _headline(run.root)


@app.command()
@_friendly
def ablate(
    run_dir: RunDir,
    names: Annotated[
        list[str] | None, typer.Argument(help="Overlay names or YAML paths (default: all)")
    ] = None,
    overlays: Annotated[
        Path | None,
        typer.Option(help="Folder of ablation overlays (default: those shipped with bts)"),
    ] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Show the overlays and exit")] = False,
    system: Annotated[
        str, typer.Option(help="The system whose stitch stage each overlay changes: bts or bts_heads")
    ] = "bts",
) -> None:
    """Re-run only the stitch stage under config overlays and add the results to the report."""
    from bts.ablate import ablate as stage
    from bts.ablate import describe, overlay_paths
    from bts.stages import Run

    r = Run.load(run_dir)
    paths = overlay_paths(names or [], overlays)
    if list_only:
        typer.echo(describe(paths, r.config, system))
        return
    _timed("ablate", stage, r, paths, system)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BtsError(f"--seeds '{text}' is not a list of integers: e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise BtsError(f"--seeds '{text}': give distinct non-negative integers, e.g. 0,1,2")
    return seeds


@app.command()
@_friendly
def sweep(
    run_dir: RunDir,
    grid: Annotated[
        Path,
        typer.Argument(help="YAML file: point name -> {description, system, stitch, baselines}"),
    ],
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated")] = "0,1,2",
    rows: Annotated[int, typer.Option(help="Validation rows scored per domain", min=1)] = 64,
    removal: Annotated[
        bool, typer.Option(help="Also score each bts point without each expert in turn")
    ] = False,
) -> None:
    """Train the stitch stage under each point of a grid with several seeds; score on validation."""
    from bts.stages import Run
    from bts.sweep import format_table
    from bts.sweep import sweep as stage

    r = Run.load(run_dir)
    summary = stage(r, grid, _seeds(seeds), rows, removal)
    typer.echo(format_table(summary))
    typer.echo(f"[bts] sweep: {r.path('sweeps', grid.stem, 'sweep.json')}", err=True)


@app.command()
@_friendly
def repeat(
    run_dir: RunDir,
    seeds: Annotated[
        int, typer.Option(help="Training seeds in all, the run's own included", min=2)
    ] = 3,
) -> None:
    """Re-train the stitch stage and the trained baselines with more seeds; mean +- sd in the
    report, and differences under two standard deviations shown as ties."""
    from bts.compare import require_complete
    from bts.repeat import repeat as stage
    from bts.stages import Run

    r = Run.load(run_dir)
    require_complete(r)  # a repeat shares the run's seed and experts: they must exist
    _timed("repeat", stage, r, seeds)
    _headline(r.root)


@app.command("add-expert")
@_friendly
def add_expert(
    run_dir: RunDir,
    name: Annotated[str, typer.Argument(help="Name (and data domain) of the new expert")],
    expert: Annotated[Path, typer.Option(help="The new expert's model directory")],
    out: Annotated[Path, typer.Option(help="Where to write the new stitched model")],
    stitched: Annotated[
        Path | None, typer.Option(help="Stitched model (default RUN/stitched)")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Training steps (default: the stitch stage's)")
    ] = None,
    force: Force = False,
) -> None:
    """Stitch in a new expert, training only its stitch parameters; the old model stays intact."""
    from bts.stages import Run
    from bts.stages import add_expert as stage

    if steps is not None and steps < 1:
        raise BtsError(f"--steps is {steps}: give at least 1 training step (or omit it)")
    r = Run.load(run_dir)
    where = stitched or r.path("stitched")
    _timed("add-expert", stage, r, where, name, expert, out, steps, force)


@app.command("remove-expert")
@_friendly
def remove_expert(
    stitched: Annotated[Path, typer.Argument(help="A stitched model directory")],
    name: Annotated[str, typer.Argument(help="Expert to remove")],
    out: Annotated[Path, typer.Option(help="Where to write the new stitched model")],
    force: Force = False,
) -> None:
    """Drop an expert with no training; the old stitched model stays intact."""
    from bts.stages import remove_expert as stage

    _timed("remove-expert", stage, stitched, name, out, force)


@app.command("eval")
@_friendly
def evaluate(
    run_dir: RunDir,
    models: Annotated[list[Path], typer.Argument(help="Model directories (HF or stitched)")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="JSON records output (default: RUN/eval-models.json, in the run directory)"
        ),
    ] = None,
) -> None:
    """Evaluate causal LMs or stitched models on the run's held-out data and tasks."""
    from bts.compare import evaluate_paths
    from bts.evaluate import format_table, write_records
    from bts.fileio import check_writable

    out = Path(run_dir) / "eval-models.json" if out is None else out
    check_writable(out)  # before the evaluation, so its results are never lost
    records = evaluate_paths(Path(run_dir), models)
    write_records(records, out)
    typer.echo(format_table(records))


@app.command("export")
@_friendly
def export_model(
    stitched: Annotated[Path, typer.Argument(help="A stitched model directory")],
    out: Annotated[Path, typer.Argument(help="Where to write the Hugging Face model directory")],
    force: Force = False,
) -> None:
    """Write a self-contained Hugging Face model directory (AutoModelForCausalLM loads it)."""
    from bts.export import export

    _timed("export", export, stitched, out, force)


@app.command("lm-eval")
@_friendly
def lm_eval(
    model: Annotated[
        Path, typer.Argument(help="A `bts export` output, a causal-LM directory or a stitched one")
    ],
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval tasks, e.g. bts_math")],
    limit: Annotated[int | None, typer.Option(help="Examples per task (default: all)")] = None,
    out: Annotated[Path | None, typer.Option(help="Write lm-eval's results as JSON")] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="A folder of extra lm-eval task YAMLs")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass")] = 1,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow a model's own code (not needed for bts exports)")
    ] = False,
) -> None:
    """Run lm-evaluation-harness tasks (bts_math ships with bts) on a model."""
    from bts.fileio import check_writable
    from bts.harness import run_lm_eval, summary_table

    if out is not None:
        check_writable(out)
    if limit is not None and limit < 1:
        raise BtsError(f"--limit is {limit}: give at least 1 example per task (or omit it)")

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    start = time.perf_counter()
    results = run_lm_eval(
        model,
        names,
        limit=limit,
        out=out,
        include_path=include_path,
        batch_size=batch_size,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    typer.echo(summary_table(results))
    where = f" -> {out}" if out else ""
    typer.echo(f"[bts] lm-eval: done in {time.perf_counter() - start:.1f} s{where}", err=True)


@app.command()
@_friendly
def plan(
    config: Config,
    processes: Annotated[int, typer.Option(help="Processes (devices) a stage runs on", min=1)] = 1,
    device_memory: Annotated[
        float | None,
        typer.Option("--device-memory", help="GiB per device: mark what does not fit", min=0.001),
    ] = None,
    fsdp: Annotated[
        bool, typer.Option("--fsdp", help="Shard weights, gradients and optimiser state (FSDP)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (bytes) instead")] = False,
) -> None:
    """Memory per device of every stage, from the models' configs alone (no weights loaded)."""
    import json

    from bts.config import load_config
    from bts.plan_report import format_plan, make_plan, plan_json

    result = make_plan(load_config(config), processes, fsdp, device_memory)
    typer.echo(json.dumps(plan_json(result), indent=1) if as_json else format_plan(result))


@data_app.command("list")
@_friendly
def data_list(config: Config, out: Out = None) -> None:
    """Each configured domain with its source, licence and train/held-out token counts."""
    rows = [data.summary() for data in _open(config, out).corpus.values()]
    header = f"{'domain':<10} {'train docs':>10} {'held-out docs':>13} {'train tokens':>13} {'held-out tokens':>15}  source (licence)"
    typer.echo(header)
    for r in rows:
        typer.echo(
            f"{r['domain']:<10} {r['train_docs']:>10} {r['held_out_docs']:>13} "
            f"{r['train_tokens']:>13} {r['held_out_tokens']:>15}  {r['source']} ({r['licence']})"
        )


@data_app.command("sample")
@_friendly
def data_sample(
    domain: Annotated[str, typer.Argument(help="Built-in domain name or a local path")],
    n: Annotated[int, typer.Option(help="How many documents")] = 2,
    chars: Annotated[int, typer.Option(help="Characters shown per document")] = 600,
    seed: int = 0,
) -> None:
    """Print a few documents of a domain."""
    from bts.data.domains import sample_documents

    if n < 1 or chars < 1:
        raise BtsError(f"--n is {n} and --chars {chars}: both must be at least 1")
    for i, text in enumerate(sample_documents(domain, n, seed)):
        typer.echo(f"--- {domain} #{i} ---\n{text[:chars]}\n")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":  # `accelerate launch -m bts.cli run CONFIG` for multi-process training
    main()
