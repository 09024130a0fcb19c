"""Data safety: names apart from paths, no write over what bts did not write, one writer per run,
every bad input refused with one line before any work."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers import tiny_model
from transformers import LlamaConfig
from typer.testing import CliRunner

from bts.cli import app
from bts.data.tokenizer import train_tokenizer
from bts.errors import BtsError
from bts.fileio import LOCK, atomic_dir, lock_run, unlock_run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

LEGAL = "\n\n".join(
    f"Article {i}. The party of the {'first' if i % 2 else 'second'} part shall pay {i * 7} "
    f"crowns to the other party within {i + 3} days of notice, unless clause {i % 5} applies."
    for i in range(60)
)

# The smallest pipeline: two steps of everything, no baselines, a few rows of evaluation.
MICRO = {
    "seed": 0,
    "data": {"seq_len": 32, "vocab_size": 300},
    "seed_model": {
        "kind": "tiny",
        "hidden_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 32,
        "batch_size": 2,
        "train": {"steps": 2, "lr": 3.0e-3},
    },
    "experts": {"batch_size": 2, "train": {"steps": 1, "lr": 1.0e-3}},
    "stitch": {"num_stitches": 2, "batch_size": 2, "train": {"steps": 1, "lr": 1.0e-3}},
    "baselines": {
        "merges": [],
        "btx": None,
        "btm": False,
        "expert_routing": None,
        "bam": None,
    },
    "eval": {"max_sequences": 2, "batch_size": 2, "math_examples": 2, "humaneval_problems": 1,
             "max_new_tokens": 4},
}


CODE = "\n\n".join(
    f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n\nclass C{i}:\n    value = {i}" for i in range(80)
)


@pytest.fixture(scope="module", autouse=True)
def small_domains(tmp_path_factory):
    """Two small user files named `code` and `math`: the micro runs then tokenise kilobytes, not
    the built-ins' 20 MB (the built-ins by path and name are tested on their own below)."""
    folder = tmp_path_factory.mktemp("domains")
    (folder / "code.txt").write_text(CODE)
    (folder / "math.txt").write_text(LEGAL)
    MICRO["data"]["domains"] = [{"code": str(folder / "code.txt")},
                                {"math": str(folder / "math.txt")}]
    return folder


def bts(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> str:
    """The command failed with exit 1 and exactly one non-empty line, with no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    lines = [line for line in lines if not re.search(r"\d+/\d+ \[", line)]  # progress bars
    assert result.exit_code == 1, result.output
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(
        result.exception, SystemExit
    ), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def micro(**sections) -> dict:
    config = json.loads(json.dumps(MICRO))
    for key, value in sections.items():
        replace = isinstance(value, dict) and value.get("kind") == "pretrained"
        if isinstance(value, dict) and isinstance(config.get(key), dict) and not replace:
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture(scope="module")
def pretrained_seed(tmp_path_factory) -> Path:
    """A tiny 'pretrained' causal LM directory with its own tokenizer."""
    out = tmp_path_factory.mktemp("pretrained") / "seed"
    tok = train_tokenizer([LEGAL, "def f(x):\n    return x + 1\n" * 20], 300, out)
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}
    ids = {k: getattr(tok, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
    tiny_model("llama-tied", **shape, **ids, vocab_size=len(tok)).save_pretrained(out)
    return out


# --- a domain given by path -------------------------------------------------------------------


def test_domain_by_absolute_path_runs_the_whole_pipeline_and_leaves_the_file(tmp_path):
    data = tmp_path / "data" / "legal.txt"
    data.parent.mkdir()
    data.write_text(LEGAL)
    before = sha(data)
    config = write_config(tmp_path / "c.yaml", micro(data={"domains": ["code", str(data)]}))
    result = bts("run", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert sha(data) == before and sorted(os.listdir(data.parent)) == ["legal.txt"]
    assert (tmp_path / "run" / "experts" / "legal").is_dir()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["domains"] == ["code", "legal"]


@pytest.mark.parametrize("form", ["relative", "mapping"])
def test_domain_by_path_with_a_pretrained_seed_never_writes_the_data(
    tmp_path, pretrained_seed, form, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    Path("corpus").mkdir()
    Path("corpus/legal.txt").write_text(LEGAL)
    before = sha(Path("corpus/legal.txt"))
    entry = "corpus/legal.txt" if form == "relative" else {"contracts": "corpus/legal.txt"}
    name = "legal" if form == "relative" else "contracts"
    config = micro(
        data={"domains": ["code", entry], "seq_len": 32},
        seed_model={"kind": "pretrained", "path": str(pretrained_seed)},
    )
    result = bts("branch", write_config(tmp_path / "c.yaml", config), "--out", "run")
    assert result.exit_code == 0, result.output
    result = bts("train-expert", tmp_path / "c.yaml", name, "--out", "run")
    assert result.exit_code == 0, result.output
    assert sha(Path("corpus/legal.txt")) == before and os.listdir("corpus") == ["legal.txt"]
    assert sorted(os.listdir("run/branches")) == sorted(["code", name])
    assert (Path("run/experts") / name / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"../escape": "legal.txt"}, "not a usable name"),
        ({"seed": "legal.txt"}, "not a usable name"),
        ({"keys": "legal.txt"}, "not a usable name"),
        ("no/such/file.txt", "neither a built-in"),
    ],
)
def test_unsafe_or_missing_domains_are_refused(tmp_path, monkeypatch, entry, fragment):
    monkeypatch.chdir(tmp_path)
    Path("legal.txt").write_text(LEGAL)
    config = write_config(tmp_path / "c.yaml", micro(data={"domains": ["code", entry]}))
    one_line_error(bts("run", config, "--out", "run"), "data.domains", fragment)
    assert not Path("run").exists()


# --- no write over what bts did not write -----------------------------------------------------


def test_atomic_dir_refuses_foreign_directories_unless_forced(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(BtsError, match="not written by bts.*--force"):
        with atomic_dir(foreign, "export"):
            pass
    assert (foreign / "thesis.tex").read_text() == "years of work"
    with atomic_dir(tmp_path / "out", "export") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(BtsError, match="bts export output, not a bts stitched"):
        with atomic_dir(tmp_path / "out", "stitched"):
            pass
    with atomic_dir(tmp_path / "out", "export") as tmp:  # its own kind is replaced
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".bts-output", "b"]
    with atomic_dir(foreign, "export", force=True) as tmp:
        (tmp / "c").write_text("3")
    assert not (foreign / "thesis.tex").exists()


def test_atomic_dir_never_writes_over_or_inside_an_input(tmp_path):
    model = tmp_path / "run" / "seed"
    model.mkdir(parents=True)
    for target in (tmp_path / "run", model, model / "sub"):
        with pytest.raises(BtsError, match="would overwrite the seed"):
            with atomic_dir(target, "stitched", force=True, inputs={"the seed": model}):
                pass
    assert model.is_dir()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("safety") / "run"
    config = write_config(run.parent / "micro.yaml", micro())
    result = bts("run", config, "--out", run)
    assert result.exit_code == 0, result.output
    return run


def test_export_and_remove_expert_refuse_foreign_folders_and_inputs(smoke_run, tmp_path):
    before = tree_hash(smoke_run)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    stitched = smoke_run / "stitched"
    one_line_error(bts("export", stitched, user), "not written by bts", "--force")
    one_line_error(bts("remove-expert", stitched, "math", "--out", user), "not written by bts")
    for target in (smoke_run, smoke_run / "seed", smoke_run / "experts" / "code", stitched):
        one_line_error(
            bts("remove-expert", stitched, "math", "--out", target), "would overwrite"
        )
        one_line_error(bts("export", stitched, target, "--force"), "would overwrite")
    one_line_error(
        bts("add-expert", smoke_run, "code", "--expert", smoke_run / "experts" / "code",
            "--out", smoke_run, "--stitched", stitched),
        "would overwrite",
    )
    assert (user / "notes.txt").read_text() == "keep me"
    assert tree_hash(smoke_run) == before
    done = bts("remove-expert", stitched, "math", "--out", user, "--force")
    assert done.exit_code == 0, done.output
    assert not (user / "notes.txt").exists() and (user / "bts_stitch.json").is_file()
    again = bts("remove-expert", stitched, "math", "--out", user)  # its own output: replaced
    assert again.exit_code == 0, again.output


def test_a_stage_never_replaces_a_users_file_in_its_output(smoke_run, tmp_path):
    one_line_error(bts("seed", SMOKE, "--out", smoke_run / "seed"), "not a bts run directory")
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", micro())
    (run / "seed").mkdir(parents=True)
    (run / "seed" / "mine.txt").write_text("mine")
    one_line_error(bts("seed", config, "--out", run), "not a bts run directory")
    (run / "config.yaml").write_text(yaml.safe_dump(micro()))
    one_line_error(bts("seed", config, "--out", run), "not written by bts", "move it away")
    assert (run / "seed" / "mine.txt").read_text() == "mine"


def test_add_expert_does_not_resume_another_experts_training(smoke_run, tmp_path):
    out = tmp_path / "added"
    stale = tmp_path / ".added.train-000000000000"
    stale.mkdir()
    (stale / "marker").write_text("from another call")
    result = bts(
        "add-expert", smoke_run, "math", "--expert", smoke_run / "experts" / "math",
        "--out", out, "--stitched", tmp_path / "minus",
    )
    one_line_error(result, "bts_stitch.json")  # no such stitched dir yet: one line
    removed = bts("remove-expert", smoke_run / "stitched", "math", "--out", tmp_path / "minus")
    assert removed.exit_code == 0, removed.output
    result = bts(
        "add-expert", smoke_run, "math", "--expert", smoke_run / "experts" / "math",
        "--out", out, "--stitched", tmp_path / "minus", "--steps", "1",
    )
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not list(tmp_path.glob(".added.train-*"))
    for steps in ("0", "-3"):
        result = bts(
            "add-expert", smoke_run, "math", "--expert", smoke_run / "experts" / "math",
            "--out", tmp_path / "other", "--stitched", tmp_path / "minus", "--steps", steps,
        )
        one_line_error(result, "--steps")
    assert not (tmp_path / "other").exists()


# --- one writer per run directory -------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from bts.fileio import lock_run
    lock_run(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".seed.tmp-abc").mkdir()  # left by a killed process
    (run / "train" / "stitch").mkdir(parents=True)
    (run / "train" / "stitch" / "checkpoint.tmp-99999").mkdir()
    (run / "train" / "stitch" / "metrics.jsonl").write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not (run / ".seed.tmp-abc").exists()  # the holder cleaned the dead one's temps
        assert not (run / "train" / "stitch" / "checkpoint.tmp-99999").exists()
        assert (run / "train" / "stitch" / "metrics.jsonl").is_file()
        with pytest.raises(BtsError, match=f"in use by another bts process \\(pid {holder.pid} on"):
            lock_run(run)
        (run / "config.yaml").write_text(yaml.safe_dump(micro()))
        config = write_config(tmp_path / "c.yaml", micro())
        one_line_error(bts("run", config, "--out", run), "in use by another bts process")
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock, the lock file stays behind
        holder.wait()
    assert (run / LOCK).is_file()
    lock_run(run)  # taken over
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    unlock_run(run)


# --- validation before any work, one line each ------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"seed_model": {"train": {"steps": 2, "lr": -1}}}, ["seed_model.train.lr", "greater than 0"]),
        ({"stitch": {"train": {"steps": 2, "lr": float("nan")}}}, ["stitch.train.lr", "finite"]),
        ({"stitch": {"train": {"steps": True, "lr": 0.001}}}, ["stitch.train.steps", "integer"]),
        ({"stitch": {"batch_size": 0}}, ["stitch.batch_size", "greater than 0"]),
        ({"stitch": {"num_stitches": 0}}, ["stitch.num_stitches"]),
        ({"stitch": {"num_stitches": 3}}, ["num_stitches=3", "number of layers (2)"]),
        ({"stitch": {"placement": [[5, "experts_into_hub"]]}}, ["placement [5]", "0..1"]),
        ({"stitch": {"placement": [[0, "experts_into_hub"], [1, "hub_into_experts"]]}},
         ["ends with a hub_into_experts"]),
        ({"stitch": {"placement": [["x", "experts_into_hub"]]}}, ["stitch.placement"]),
        ({"experts": {"domains": []}}, ["experts.domains", "at least 1"]),
        ({"data": {"domains": []}}, ["data.domains", "at least 1"]),
        ({"data": {"domains": ["code", "code"]}}, ["two domains are named 'code'"]),
        ({"experts": {"domains": ["code", "code"]}}, ["experts.domains", "more than once"]),
        ({"stitch": {"domains": ["nope"]}}, ["stitch.domains", "nope"]),
        ({"data": {"seq_len": 32}, "seed_model": "PRETRAINED-96"}, ["seq_len 96", "64 positions"]),
    ],
)
def test_bad_values_are_one_line_naming_the_key_and_nothing_is_written(
    tmp_path, pretrained_seed, change, fragments
):
    if change.get("seed_model") == "PRETRAINED-96":
        change = {"data": {"seq_len": 96},
                  "seed_model": {"kind": "pretrained", "path": str(pretrained_seed)}}
    config = write_config(tmp_path / "bad.yaml", micro(**change))
    one_line_error(bts("run", config, "--out", tmp_path / "run"), *fragments)
    assert not (tmp_path / "run").exists()


def test_a_corrected_config_is_accepted_where_a_failed_one_was_tried(tmp_path):
    bad = write_config(tmp_path / "c.yaml", micro(stitch={"num_stitches": 9}))
    run = tmp_path / "run"
    run.mkdir()
    one_line_error(bts("seed", bad, "--out", run), "num_stitches=9")
    assert os.listdir(run) == []
    (run / "config.yaml").write_text(yaml.safe_dump(micro(seed=5)))  # an older attempt's
    good = write_config(tmp_path / "c.yaml", micro())
    result = bts("data", "list", good, "--out", run)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0


def test_cli_options_and_outputs_are_checked_before_work(smoke_run, tmp_path):
    one_line_error(bts("data", "sample", "code", "--n", "-2"), "--n is -2")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(bts("run", write_config(tmp_path / "c.yaml", micro()), "--out", a_file),
                   "is a file")
    one_line_error(bts("report", tmp_path / "nothing"), "not a run directory")
    one_line_error(bts("eval", smoke_run, smoke_run / "seed", "--out", tmp_path),
                   "is a directory")


def test_report_refuses_an_incomplete_run_and_trains_nothing(tmp_path):
    config = write_config(tmp_path / "c.yaml", micro())
    run = tmp_path / "run"
    assert bts("seed", config, "--out", run).exit_code == 0
    before = sorted(p.name for p in run.iterdir())
    one_line_error(bts("report", run), "not complete", "experts/code", "bts run")
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_outputs_are_one_line(smoke_run, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line_error(bts("eval", smoke_run, smoke_run / "seed", "--out", locked / "e.json"),
                       "cannot write")
        config = write_config(tmp_path / "c.yaml", micro())
        one_line_error(bts("seed", config, "--out", locked / "run"), "cannot use")
    finally:
        locked.chmod(0o755)


def test_os_errors_become_one_line(monkeypatch, tmp_path):
    from bts import stages

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr(stages, "lock_run", denied)
    config = write_config(tmp_path / "c.yaml", micro())
    one_line_error(bts("seed", config, "--out", tmp_path / "run"), "Permission denied",
                   str(tmp_path / "run"))


def test_pickle_only_constituent_is_one_line(tmp_path):
    import torch

    folder = tmp_path / "bin_only"
    folder.mkdir()
    LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(folder)
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    config = write_config(
        tmp_path / "c.yaml", micro(seed_model={"kind": "pretrained", "path": str(folder)})
    )
    start = time.perf_counter()
    one_line_error(bts("seed", config, "--out", tmp_path / "run"), "safetensors")
    assert time.perf_counter() - start < 60


def test_temporary_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import tempfile

    from bts.fileio import process_tempdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"bts-x-{dead.pid}-abc"
    mine = tmp_path / f"bts-x-{os.getpid()}-def"
    left.mkdir()
    mine.mkdir()
    with process_tempdir("bts-x-") as work:
        assert work.parent == tmp_path and work.name.startswith(f"bts-x-{os.getpid()}-")
        assert not left.exists() and mine.exists()
    assert not work.exists()


@pytest.mark.parametrize("content", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_is_refused_not_run_on_defaults(tmp_path, content):
    config = tmp_path / "empty.yaml"
    config.write_text(content)
    one_line_error(bts("run", config, "--out", tmp_path / "run"), "is empty",
                   "copy configs/demo.yaml")
    assert not (tmp_path / "run").exists()


def test_a_runs_own_config_reruns_that_run_by_default(smoke_run):
    from bts.cli import default_out

    assert default_out(smoke_run / "config.yaml") == smoke_run
    assert default_out(SMOKE) == Path("runs") / "smoke"
