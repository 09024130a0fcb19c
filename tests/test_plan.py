"""`bts plan` (bts.plan, bts.plan_report): parameter counts equal the real models', activation
coefficients equal what autograd keeps, sharding and dtypes scale what they should, and the
command runs on the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from bts.baselines import registry
from bts.baselines.bam import BAMConfig, BAMForCausalLM, set_bam_trainable
from bts.baselines.btx import BTXForCausalLM, btx_config, mixtral_kwargs, set_btx_trainable
from bts.cli import app
from bts.config import load_config, parse_config
from bts.plan import Shape, Shapes, baseline_stage, per_device, shape_of, stages, stitch_params
from bts.plan_report import make_plan, read_shapes
from bts.spec import PAPER_SPEC, StitchSpec
from bts.stitch import StitchedModel

ROOT = Path(__file__).resolve().parents[1]
TINY_SEED = {"kind": "tiny", "hidden_size": 32, "num_layers": 4, "num_heads": 4,
             "num_kv_heads": 2, "intermediate_size": 64}  # fmt: skip


def _config(**sections):
    base = {"data": {"domains": ["code", "prose", "math"], "seq_len": 16, "vocab_size": 300},
            "seed_model": TINY_SEED}  # fmt: skip
    return parse_config({**base, **sections})


def _numel(model, trainable=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("arch", ["llama-tied", "llama-untied", "qwen2-untied", "mistral"])
def test_planned_parameters_are_the_real_models(arch):
    model = tiny_model(arch)
    assert shape_of(model.config).params() == _numel(model)


def test_the_tiny_seed_is_planned_from_its_config_section():
    config = _config()
    seed = read_shapes(config).seed
    real = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ))  # fmt: skip
    assert seed.params() == _numel(real)


@pytest.mark.parametrize(
    ("spec", "widths"),
    [
        (StitchSpec(), [32, 32]),
        (StitchSpec(), [32, 48]),  # an expert of another width: P_i is d_i x d_0
        (StitchSpec(output="mixture"), [48, 32, 32]),
        (StitchSpec(output="mixture", output_evidence=False), [32]),
        (PAPER_SPEC, [32, 48]),  # no gate bias
    ],
)
def test_planned_stitch_parameters_are_what_train_only_counts(spec, widths):
    hub = tiny_model()
    experts = {f"e{i}": tiny_model(seed=i + 1, hidden_size=w) for i, w in enumerate(widths)}
    model = StitchedModel.from_models(hub, experts, num_stitches=4, spec=spec)
    assert stitch_params(model.spec, 32, widths) == model.train_only()


def test_every_stitch_point_counts():
    hub = tiny_model()
    model = StitchedModel.from_models(hub, {"e": tiny_model(seed=1)}, num_stitches=3)
    assert stitch_params(model.spec, 32, [32]) == model.train_only()


def _baseline_stage(config, name):
    system = registry.find_system(config.baselines, name)
    return system, baseline_stage(config, read_shapes(config), system)


@pytest.mark.parametrize(
    ("name", "baselines"),
    [
        ("btx_top2", {"btx": {}, "btx_variants": ["top2"]}),
        (
            "btx_soft",
            {"btx": {"train_all": False, "include_seed": False}, "btx_variants": ["soft"]},
        ),
        ("bam", {"bam": {}}),
        ("bam_adapters", {"bam": None, "bam_adapters": {"adapters": True, "train_all": False}}),
    ],
)
def test_planned_btx_and_bam_are_the_real_models(name, baselines):
    config = _config(baselines=baselines)
    system, stage = _baseline_stage(config, name)
    seed = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    spec = system.spec
    names = (["seed"] if spec.include_seed else []) + config.expert_names
    if name.startswith("btx"):
        model = BTXForCausalLM(btx_config(seed, spec, names))
        trainable = set_btx_trainable(model, spec.train_all)
    else:
        kwargs = mixtral_kwargs(seed, spec.ffn_routing, spec, names)
        model = BAMForCausalLM(BAMConfig(**kwargs, bam_attention_experts=len(names),
                                         bam_adapters=spec.adapters))  # fmt: skip
        trainable = set_bam_trainable(model, spec.train_all)
    assert stage.trainable == trainable
    assert stage.trainable + stage.frozen_bytes // 4 == _numel(model)


def _saved_floats_per_token(model, frozen: bool, tokens=(2, 16)) -> float:
    """Elements autograd keeps per token (parameters excluded; each storage once)."""
    model.requires_grad_(not frozen)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 101, tokens)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=embeds, labels=ids)
    return sum(seen.values()) / 4 / (tokens[0] * tokens[1])


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("shape", [{}, {"hidden_size": 64, "intermediate_size": 96},
                                   {"num_key_value_heads": 4}])  # fmt: skip
def test_block_activations_are_what_autograd_keeps(frozen, shape):
    """One more block keeps exactly the docstring's coefficients (+ 2 elements of bookkeeping)."""
    one, two = (tiny_model(num_hidden_layers=n, **shape) for n in (1, 2))
    block = _saved_floats_per_token(two, frozen) - _saved_floats_per_token(one, frozen)
    planned = shape_of(one.config)
    expected = planned.frozen_block() if frozen else planned.trained_block()
    assert abs(block - expected) <= 2, (block, expected)


def _stage(config, name):
    return next(s for s in stages(config, read_shapes(config)) if s.name == name)


def test_fsdp_divides_what_it_shards_and_ddp_replicates_it():
    stage = _stage(_config(), "bts")
    one, ddp, fsdp = per_device(stage), per_device(stage, 4), per_device(stage, 4, fsdp=True)
    for part in ("weights", "trainable", "optimiser"):
        assert getattr(ddp, part) == getattr(one, part) > 0
        assert getattr(fsdp, part) == getattr(ddp, part) // 4
    assert ddp.gradients == 2 * one.gradients  # DDP's buckets copy the gradients
    assert fsdp.gradients == one.gradients // 4
    assert ddp.activations == fsdp.activations < one.activations  # each device: 16 / 4 rows
    assert fsdp.transient > 0 == ddp.transient


def test_evaluation_runs_in_one_process_whatever_the_launcher():
    stage = _stage(_config(), "eval bts")
    assert per_device(stage, 8, fsdp=True) == per_device(stage)


def test_bf16_constituents_take_half_the_weights():
    fp32 = _stage(_config(), "bts")
    bf16 = _stage(_config(stitch={"constituent_dtype": "bfloat16"}), "bts")
    assert bf16.frozen_bytes * 2 == fp32.frozen_bytes
    assert bf16.trainable == fp32.trainable  # stitch parameters stay fp32
    assert bf16.token_bytes < fp32.token_bytes


def test_recomputing_frozen_blocks_keeps_fewer_activations():
    kept = _stage(_config(), "bts")
    recomputed = _stage(_config(stitch={"checkpoint_frozen": True}), "bts")
    assert recomputed.token_bytes < kept.token_bytes


def test_the_stages_follow_the_config():
    names = [s.name for s in stages(_config(bts_heads=None, baselines={"bam": None}),
                                    read_shapes(_config()))]  # fmt: skip
    assert names[:3] == ["seed", "experts", "bts"]
    assert "bts_heads" not in names and "bam" not in names and "expert_routing" in names
    assert names[-1] == "eval bts"


def test_a_stage_that_does_not_fit_says_what_would_help():
    plan = make_plan(load_config(ROOT / "configs" / "demo.yaml"), device_memory=0.7)
    fits = {memory.stage: fit for memory, fit, _ in plan.rows}
    advice = {memory.stage: tips for memory, fits, tips in plan.rows if fits is False}
    assert fits["seed"] and not fits["bts"]
    for knob in ("constituent_dtype", "checkpoint_frozen", "half the batch", "FSDP over"):
        assert any(knob in tip for tip in advice["bts"]), advice["bts"]


def _cli(*args):
    return CliRunner().invoke(app, ["plan", *map(str, args)])


@pytest.mark.parametrize(
    "config", ["configs/demo.yaml", *sorted(str(p.relative_to(ROOT))
                                            for p in (ROOT / "configs" / "plans").glob("*.yaml"))]
)  # fmt: skip
def test_bts_plan_runs_on_the_shipped_configs(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # the plans name their config.json folders from the repository root
    result = _cli(config, "--processes", 8, "--fsdp", "--device-memory", 80)
    assert result.exit_code == 0, result.output
    assert "bts" in result.output and "eval bts" in result.output
    out = json.loads(_cli(config, "--json").output)
    assert out["stages"] and all(s["total"] > s["runtime"] for s in out["stages"])


def test_a_config_json_alone_is_enough(tmp_path):
    (tmp_path / "config.json").write_text(
        (ROOT / "configs/plans/llama3-8b/config.json").read_text()
    )
    config = parse_config({"seed_model": {"kind": "pretrained", "path": str(tmp_path)}})
    seed = read_shapes(config).seed
    assert seed == Shape(128256, 4096, 32, 32, 8, 14336, tied=False, head_dim=128)
    assert seed.params() == 8_030_261_248  # Llama-3-8B's published count


def test_a_wrong_key_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stitch: {num_stiches: 4}\n")
    result = _cli(bad)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {bad}: unknown key 'stitch.num_stiches': fix the config (see configs/demo.yaml)"
    ]


def test_shapes_can_be_given_without_reading_files():
    shapes = Shapes(Shape(300, 32, 4, 4, 2, 64), {"code": Shape(300, 32, 4, 4, 2, 64)})
    config = _config(data={"domains": ["code"], "seq_len": 16, "vocab_size": 300})
    assert make_plan(config, shapes=shapes).rows
