"""The whole pipeline on configs/smoke.yaml: stages, skipping, add/remove expert, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from bts.cli import app
from bts.stitch import StitchedModel

pytestmark = pytest.mark.slow  # the whole pipeline (minutes)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def bts(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def stage_files(run: Path) -> dict[str, float]:
    """Every file a stage wrote, with its modification time (the cache and report excluded)."""
    keep = ("seed", "branches", "experts", "stitched", "baselines", "train", "tokenizer")
    return {
        str(p.relative_to(run)): p.stat().st_mtime_ns
        for p in run.rglob("*")
        if p.is_file() and p.relative_to(run).parts[0] in keep
    }


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("smoke") / "run"
    result = bts("run", SMOKE, "--out", run)
    assert result.exit_code == 0, result.output
    return run


def test_run_writes_every_stage_and_a_second_run_skips_them(smoke_run):
    parts = ("seed", "tokenizer", "stitched", "stitched_heads", "baselines/btx_top2", "baselines/bam")
    for part in parts:
        assert (smoke_run / part).exists(), part
    experts = yaml.safe_load(SMOKE.read_text())["data"]["domains"]
    assert sorted(p.name for p in (smoke_run / "experts").iterdir()) == sorted(experts)
    before = stage_files(smoke_run)
    result = bts("run", SMOKE, "--out", smoke_run)
    assert result.exit_code == 0, result.output
    assert stage_files(smoke_run) == before  # nothing retrained or rewritten


def test_report_has_every_system_and_domain_with_finite_values(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    domains = report["domains"]
    expected = {"seed", "bts", "bts_heads", "linear", "task_arithmetic", "ties", "dare_ties", "btm"}
    expected |= {"expert_routing", "btx_soft", "btx_top1", "btx_top2", "btx", "bam"}
    expected |= {f"expert:{d}" for d in domains} | {f"bts-minus:{d}" for d in domains}
    expected |= {f"bts_heads-minus:{d}" for d in domains}
    assert set(report["systems"]) == expected
    for name, system in report["systems"].items():
        assert set(domains) <= set(system["loss"]), name
        values = list(system["loss"].values()) + list(system["accuracy"].values())
        assert all(math.isfinite(v) for v in values), name
        assert system["params_total"] >= system["params_trained"] >= 0
    bts_entry = report["systems"]["bts"]
    assert 0 < bts_entry["params_trained"] < bts_entry["params_total"]
    assert bts_entry["train_tokens"] > 0
    trained = ("bts_heads", "expert_routing", "btx_soft", "btx_top1", "btx_top2", "bam")
    for name in trained:  # the same mix and the same number of tokens as the stitch stage
        assert report["systems"][name]["train_tokens"] == bts_entry["train_tokens"], name
    systems = report["systems"]
    assert systems["btx"]["alias_of"] == "btx_top2"
    assert systems["btx"]["loss"] == systems["btx_top2"]["loss"]
    active = {n: s["params_active"] for n, s in systems.items()}
    assert (
        active["btx_top1"]
        < active["btx_top2"]
        < active["btx_soft"]
        == systems["btx_soft"]["params_total"]
    )
    assert active["btm"] == systems["btm"]["params_total"]
    assert active["expert_routing"] < systems["expert_routing"]["params_total"]
    assert 0 < systems["expert_routing"]["params_trained"] < active["expert_routing"]
    # the output stitch runs every expert whole (their own heads), bts skips what cannot matter
    assert active["bts"] <= active["bts_heads"] == systems["bts_heads"]["params_total"]
    assert 0 < systems["bts_heads"]["params_trained"] - bts_entry["params_trained"] < 1000
    gates = json.loads((smoke_run / "gates.json").read_text())
    assert set(gates["output"]["mean"]) == set(gates["layer_mean"])
    assert "### Output gate (`bts_heads`)" in (smoke_run / "report.md").read_text()
    pngs = ("loss_vs_seed.png", "training_curves.png", "gates_layers.png", "gates_tokens.png")
    for png in (*pngs, "gates_output.png"):
        assert (smoke_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merges_equal_what_mergekit_produces(smoke_run, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    experts = sorted((smoke_run / "experts").iterdir())
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str((smoke_run / "seed").resolve()),
        "models": [{"model": str(p.resolve()), "parameters": {"weight": 1.0}} for p in experts],
        "parameters": {"lambda": 0.5, "normalize": False},
        "dtype": "float32",
    }
    run_merge(
        MergeConfiguration.model_validate(config),
        str(tmp_path / "direct"),
        options=MergeOptions(device="cpu", write_model_card=False, random_seed=0),
    )
    ours = load_file(smoke_run / "baselines" / "task_arithmetic" / "model.safetensors")
    direct = load_file(tmp_path / "direct" / "model.safetensors")
    assert ours.keys() == direct.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], direct[key], rtol=0, atol=1e-6)


def test_add_then_remove_expert_returns_the_original_logits(smoke_run, tmp_path):
    stitched = smoke_run / "stitched"
    without = tmp_path / "without-math"
    assert bts("remove-expert", stitched, "math", "--out", without).exit_code == 0
    with_again = tmp_path / "with-math"
    result = bts(
        "add-expert",
        smoke_run,
        "math",
        "--expert",
        smoke_run / "experts" / "math",
        "--stitched",
        without,
        "--out",
        with_again,
        "--steps",
        "3",
    )
    assert result.exit_code == 0, result.output
    removed_again = tmp_path / "removed-again"
    assert bts("remove-expert", with_again, "math", "--out", removed_again).exit_code == 0
    assert (stitched / "bts_stitch.json").is_file()  # the originals stay intact

    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    models = [StitchedModel.from_pretrained(p).eval() for p in (without, with_again, removed_again)]
    assert models[1].expert_names[-1] == "math"
    with torch.no_grad():
        logits = [m(ids).logits for m in models]
    assert torch.equal(logits[2], logits[0])
    assert not torch.equal(logits[1], logits[0])  # the added expert was trained and matters


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "seed_model: {kind: tiny, hidden_sise: 64}\n",
            "unknown key 'seed_model.hidden_sise'",
        ),
        ("stitch: {batch_size: many}\n", "stitch.batch_size"),
        ("seed_model: {kind: pretrained, path: /no/such/model}\n", "does not exist"),
        ("data: [oops\n", "not valid YAML"),
    ],
)
def test_bad_configs_fail_with_one_line_before_any_work(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = bts("run", config, "--out", tmp_path / "run")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate_and_their_resolved_form_reloads(name):
    from bts.config import dump_config, load_config, parse_config

    config = load_config(ROOT / "configs" / name)
    assert parse_config(yaml.safe_load(dump_config(config))) == config


def test_missing_config_and_run_dir_are_clear_errors(tmp_path):
    result = bts("run", tmp_path / "nope.yaml")
    assert result.exit_code == 1 and "config file" in result.output
    result = bts("report", tmp_path)
    assert result.exit_code == 1 and "not a run directory" in result.output


def test_eval_and_data_commands_on_a_run(smoke_run, tmp_path):
    out = tmp_path / "eval.json"
    result = bts("eval", smoke_run, smoke_run / "seed", smoke_run / "stitched", "--out", out)
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    models = {r["model"] for r in records}
    assert models == {str(smoke_run / "seed"), str(smoke_run / "stitched")}
    losses = {(r["model"], r["domain"]): r["loss"] for r in records if r["task"] == "loss"}
    report = json.loads((smoke_run / "report.json").read_text())
    for domain in report["domains"]:  # the same numbers as the report's, from the same rows
        assert losses[(str(smoke_run / "seed"), domain)] == pytest.approx(
            report["systems"]["seed"]["loss"][domain], abs=1e-9
        )
        assert losses[(str(smoke_run / "stitched"), domain)] == pytest.approx(
            report["systems"]["bts"]["loss"][domain], abs=1e-9
        )
    listed = bts("data", "list", SMOKE, "--out", smoke_run)
    assert listed.exit_code == 0, listed.output
    for domain in report["domains"]:
        assert any(line.startswith(domain) for line in listed.output.splitlines())


ABLATIONS = ROOT / "src" / "bts" / "ablations"  # shipped as package data


def test_every_ablation_overlay_runs_and_joins_the_report(smoke_run):
    names = sorted(p.stem for p in ABLATIONS.glob("*.yaml"))
    result = bts("ablate", smoke_run, "--overlays", ABLATIONS)
    assert result.exit_code == 0, result.output
    report = json.loads((smoke_run / "report.json").read_text())
    assert sorted(report["ablations"]) == names
    for name, entry in report["ablations"].items():
        assert set(report["domains"]) <= set(entry["loss"]), name
        assert all(math.isfinite(v) for v in entry["loss"].values()), name
        assert entry["train_tokens"] == report["systems"]["bts"]["train_tokens"], name
    text = (smoke_run / "report.md").read_text()
    assert "## Ablations" in text and all(f"`{n}`" in text for n in names)
    assert (smoke_run / "ablation_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_ablation_of_bts_heads_keeps_the_output_stitch(smoke_run):
    from bts.stitch import EXPERTS_INTO_HUB, StitchedModel

    result = bts("ablate", smoke_run, "e2h_only", "--system", "bts_heads")
    assert result.exit_code == 0, result.output
    report = json.loads((smoke_run / "report.json").read_text())
    entry = report["ablations"]["bts_heads/e2h_only"]
    assert entry["system"] == "bts_heads"
    assert entry["train_tokens"] == report["systems"]["bts_heads"]["train_tokens"]
    model = StitchedModel.from_pretrained(smoke_run / "ablations/bts_heads/e2h_only/stitched")
    assert model.output is not None  # the overlay went over bts_heads's config, not bts's
    assert {p.kind for p in model.placement} == {EXPERTS_INTO_HUB}
    assert "`bts_heads/e2h_only`" in (smoke_run / "report.md").read_text()


def test_ablation_models_change_what_their_overlay_says(smoke_run):
    from bts.ablate import load_ablation
    from bts.models import load_causal_lm, weights_sha256
    from bts.stages import Run, build_stitched, make_seed, stitch_sampler, train_expert
    from bts.stitch import EXPERTS_INTO_HUB

    run = Run.load(smoke_run)
    layers = run.config.seed_model.num_layers

    def built(name, **stitch):
        config = load_ablation(ABLATIONS / f"{name}.yaml", run.config).config
        changed = config.stitch.model_copy(update=stitch)
        return build_stitched(run, config.model_copy(update={"stitch": changed}))

    assert [p.after_layer for p in built("stitches_1").placement] == [layers - 1]
    assert len(built("stitches_all").placement) == layers
    assert {p.kind for p in built("e2h_only").placement} == {EXPERTS_INTO_HUB}
    hub_math = built("hub_math")
    assert weights_sha256(hub_math.hub) == weights_sha256(load_causal_lm(train_expert(run, "math")))
    assert sorted(hub_math.expert_names) == sorted(["seed", "code", "prose", "french"])
    assert weights_sha256(hub_math.experts["seed"]) == weights_sha256(
        load_causal_lm(make_seed(run))
    )
    general = load_ablation(ABLATIONS / "general_data.yaml", run.config).config
    assert "prose" not in build_stitched(run, general).expert_names
    sampler = stitch_sampler(run, general.stitch_domains, general.stitch)
    probs = dict(zip(sampler.names, sampler.probs, strict=True))
    assert probs["prose"] == pytest.approx(0.55)  # general data with no expert
    ids = torch.arange(12)[None] % run.config.data.vocab_size
    seed_logits = load_causal_lm(make_seed(run))(ids).logits
    with torch.no_grad():
        assert torch.equal(built("no_general_data", init="identity").eval()(ids).logits, seed_logits)
        # the default start (uniform_into_hub) is an even blend into the hub, not the hub
        assert not torch.allclose(built("no_general_data").eval()(ids).logits, seed_logits)
        assert not torch.allclose(built("random_init").eval()(ids).logits, seed_logits)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("stitch: {num_stitchez: 1}\n", "unknown key 'stitch.num_stitchez'"),
        ("data: {seq_len: 8}\nstitch: {}\n", "holds `description` and a `stitch` section only"),
        ("stitch: {hub: klingon}\n", "stitch.hub 'klingon'"),
        ("stitch: {experts: [klingon]}\n", "are not experts"),
    ],
)
def test_bad_ablation_overlays_are_one_line(smoke_run, tmp_path, content, message):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(content)
    result = bts("ablate", smoke_run, overlay)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_inference_options_of_the_config_reach_stitched_models(smoke_run):
    from bts.compare import configure
    from bts.config import InferenceConfig
    from bts.stages import Run

    run = Run.load(smoke_run)
    off = InferenceConfig(batched=False, assistant=None, prune_threshold=0.2)
    run.config = run.config.model_copy(update={"inference": off})
    model = configure(StitchedModel.from_pretrained(smoke_run / "stitched"), run)
    assert model.batched_reason == "batched is off"
    assert model.inference.assistant is None and model.inference.prune_threshold == 0.2


def test_sweep_scores_validation_rows_per_seed_and_seed_0_is_the_runs_stitch(smoke_run, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "ours: {description: the run's own, stitch: {}}\n"
        "uniform: {description: even blend, stitch: {init: uniform}}\n"
        "btx_slow: {system: btx_top2, baselines: {btx_train: {steps: 3, lr: 1.0e-4}}}\n"
    )
    report = (smoke_run / "report.json").read_bytes()
    result = bts("sweep", smoke_run, grid, "--seeds", "0,1", "--rows", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads((smoke_run / "sweeps" / "grid" / "sweep.json").read_text())
    means = {n: p["mean"]["average"] for n, p in summary["points"].items()}
    assert summary["split"] == "validation" and summary["best"] == min(means, key=means.get)
    ours = summary["points"]["ours"]["per_seed"]
    assert ours["0"] != ours["1"]  # another training seed: other batches and dropout masks
    # training seed 0 is exactly the run's stitch stage: same batches, same masks, same weights
    seed0 = load_file(smoke_run / "sweeps/grid/ours/seed-0/stitched/stitch.safetensors")
    run_own = load_file(smoke_run / "stitched" / "stitch.safetensors")
    assert seed0.keys() == run_own.keys()
    assert all(torch.equal(seed0[k], run_own[k]) for k in seed0)
    uniform = load_file(smoke_run / "sweeps/grid/uniform/seed-0/stitched/stitch.safetensors")
    assert any(not torch.equal(uniform[k], run_own[k]) for k in uniform)
    # a baseline point trains that baseline alone, at its overlay's schedule
    trial = smoke_run / "sweeps/grid/btx_slow/seed-0"
    assert sorted(p.name for p in (trial / "baselines").iterdir()) == ["btx_top2"]
    assert not (trial / "stitched").exists()
    steps = json.loads((trial / "train/btx_top2/train_result.json").read_text())["steps"]
    assert steps == 3 and summary["points"]["btx_slow"]["system"] == "btx_top2"
    # validation rows, not the report's: the run's report is untouched
    assert (smoke_run / "report.json").read_bytes() == report
    def trained():  # every file of each (point, seed): weights and validation scores
        return {p: p.stat().st_mtime_ns for p in (smoke_run / "sweeps").rglob("seed-*/**/*")}

    before = trained()
    again = bts("sweep", smoke_run, grid, "--seeds", "0,1", "--rows", "2")
    assert again.exit_code == 0 and len(before) > 4 and trained() == before
    bad = bts("sweep", smoke_run, grid, "--seeds", "0,x")
    assert bad.exit_code != 0 and "not a list of integers" in bad.output
    grid.write_text("x: {system: btm, stitch: {}}\n")
    bad = bts("sweep", smoke_run, grid)
    assert bad.exit_code != 0 and "system 'btm' is not trained" in bad.output


def test_sweep_with_removal_scores_each_domain_without_its_expert(smoke_run, tmp_path):
    from bts.stages import Run
    from bts.sweep import validation_scores

    grid = tmp_path / "grid.yaml"
    grid.write_text("ours: {description: the run's own, stitch: {}}\n")
    result = bts("sweep", smoke_run, grid, "--seeds", "0", "--rows", "2", "--removal")
    assert result.exit_code == 0, result.output
    scores = json.loads((smoke_run / "sweeps/grid/ours/seed-0/validation.json").read_text())
    scores = scores["scores"]
    run = Run.load(smoke_run)
    full = validation_scores(run, StitchedModel.from_pretrained(smoke_run / "stitched"), 2)
    moved = 0.0
    for domain in run.corpus:
        model = StitchedModel.from_pretrained(smoke_run / "stitched")
        model.remove_expert(domain)
        minus = validation_scores(run, model, 2)
        assert scores[f"without:{domain}"] == minus[domain]
        moved = max(moved, *(abs(minus[d] - full[d]) for d in run.corpus if d != domain))
    assert scores["moved"] == moved > 0


def test_repeat_retrains_trained_systems_with_other_seeds_and_reports_ties(smoke_run):
    result = bts("repeat", smoke_run, "--seeds", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((smoke_run / "report.json").read_text())
    repeats = report["repeats"]
    assert repeats["seeds"] == [0, 1]
    trained = {"bts", "bts_heads", "btx_soft", "btx_top1", "btx_top2", "bam", "expert_routing"}
    assert trained <= set(repeats["systems"])
    assert not {"seed", "linear", "btm"} & set(repeats["systems"])  # nothing to re-train
    for name, entry in repeats["systems"].items():
        # seed 0 is the run's own number, seed 1 a new training
        assert entry["per_seed"]["0"]["code"] == report["systems"][name]["loss"]["code"], name
        assert entry["per_seed"]["1"] != entry["per_seed"]["0"], name
        assert report["systems"][name]["average_sd"] == entry["sd"]["average"]
    assert set(repeats["bts_vs"]) == set(repeats["systems"]) - {"bts"}
    domains = report["domains"]
    for name in ("seed", "linear", "btm"):  # not re-trained: one value over the stitch seeds
        own = sum(report["systems"][name]["loss"][d] for d in domains) / len(domains)
        assert report["systems"][name]["average_sd"] == 0.0
        assert abs(report["systems"][name]["average_mean"] - own) < 1e-12
    assert "average_sd" not in report["systems"]["bts-minus:math"]  # follows bts's seed
    rerendered = bts("report", smoke_run)  # the report stage keeps what `bts repeat` added
    assert rerendered.exit_code == 0, rerendered.output
    assert json.loads((smoke_run / "report.json").read_text())["repeats"] == repeats
    # a repeat shares the run's seed and experts and trains in its own directory
    one = smoke_run / "repeats" / "seed-1"
    assert (one / "stitched" / "bts_stitch.json").is_file() and not (one / "seed").exists()
    manifest = json.loads((one / "stitched" / "bts_stitch.json").read_text())
    assert (one / "stitched" / manifest["hub"]["path"]).resolve() == (smoke_run / "seed").resolve()
    assert "## Repeated seeds" in (smoke_run / "report.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in (smoke_run / "repeats").rglob("*") if p.is_file()}
    again = bts("repeat", smoke_run, "--seeds", "2")
    assert again.exit_code == 0, again.output
    after = {p: p.stat().st_mtime_ns for p in (smoke_run / "repeats").rglob("*") if p.is_file()}
    assert after == before  # nothing re-trained or re-scored


# --- pretrained experts (experts.pretrained) --------------------------------------------------


def _byo_config(smoke_run: Path, tmp_path: Path, experts: dict[str, Path], **more) -> Path:
    """The smoke run's seed and some of its experts, given as models from outside."""
    config = yaml.safe_load(SMOKE.read_text())
    config["seed_model"] = {"kind": "pretrained", "path": str(smoke_run / "seed")}
    config["experts"] = {"domains": [], "pretrained": {n: str(p) for n, p in experts.items()}}
    config["baselines"] = {"btx": None, "bam": None, "merges": [{"method": "linear"}]}
    config.update(more)
    path = tmp_path / "byo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pretrained_experts_are_stitched_and_reported_without_training(smoke_run, tmp_path):
    from bts.models import load_causal_lm, weights_sha256

    given = {"code": smoke_run / "experts/code", "math": smoke_run / "experts/math",
             "other": smoke_run / "experts/prose"}  # `other` is no data domain
    run = tmp_path / "byo"
    result = bts("run", _byo_config(smoke_run, tmp_path, given), "--out", run)
    assert result.exit_code == 0, result.output
    assert not (run / "train" / "experts").exists() and not (run / "branches").exists()
    for name, source in given.items():  # imported as they are
        assert weights_sha256(load_causal_lm(run / "experts" / name)) == weights_sha256(
            load_causal_lm(source)
        )
    manifest = json.loads((run / "stitched" / "bts_stitch.json").read_text())
    assert sorted(manifest["experts"]) == ["code", "math", "other"]
    report = json.loads((run / "report.json").read_text())
    assert {"bts", "btm", "expert:other", "bts-minus:other"} <= set(report["systems"])
    assert report["systems"]["expert:other"]["train_tokens"] == 0
    assert (run / "report.md").is_file()


def test_a_pretrained_expert_with_another_tokenizer_is_refused_before_any_work(
    smoke_run, tmp_path
):
    import shutil

    from bts.data.tokenizer import train_tokenizer

    odd = tmp_path / "odd"
    shutil.copytree(smoke_run / "experts/code", odd)
    for f in odd.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(["quite other words entirely"] * 20, 300, odd)
    run = tmp_path / "refused"
    result = bts("run", _byo_config(smoke_run, tmp_path, {"odd": odd}), "--out", run)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "pretrained expert 'odd'" in lines[0] and "another tokenizer" in lines[0]
    assert not run.exists()  # nothing written


def test_a_pretrained_expert_of_another_shape_runs_and_one_shape_baselines_are_named(
    smoke_run, tmp_path
):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    wide = tmp_path / "wide"  # the seed's tokenizer, twice its width and one layer more
    config = AutoConfig.from_pretrained(smoke_run / "seed")
    config.hidden_size, config.intermediate_size = 2 * config.hidden_size, 2 * config.intermediate_size
    config.num_hidden_layers += 1
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(wide)
    AutoTokenizer.from_pretrained(smoke_run / "seed").save_pretrained(wide)
    given = {"code": smoke_run / "experts/code", "wide": wide}
    run = tmp_path / "mixed"
    result = bts("run", _byo_config(smoke_run, tmp_path, given), "--out", run)
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert {"bts", "btm", "expert_routing", "expert:wide"} <= set(report["systems"])
    assert "linear" not in report["systems"]
    assert "expert 'wide' has hidden_size 64" in report["skipped"]["linear"]
    assert "Not run here: `linear`" in (run / "report.md").read_text()
