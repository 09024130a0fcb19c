"""Pretrained experts (bts.pretrained): each check is one line naming the expert and the fix,
and baselines that need one shape are left out, with the reason, when an expert has another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TEXTS, tiny_model

from bts import BtsError
from bts.config import parse_config
from bts.data.tokenizer import train_tokenizer
from bts.pretrained import check_expert, read_config, read_tokenizer
from bts.stages import baseline_systems, shape_difference


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A seed and experts saved with one tokenizer: same shape, wider, short context, fp64."""
    root = tmp_path_factory.mktemp("pretrained")
    tokenizer = train_tokenizer(TEXTS * 4, 300, root / "tokenizer")
    shapes = {
        "seed": {}, "same": {}, "wider": {"intermediate_size": 96},
        "short": {"max_position_embeddings": 16}, "qwen": {},
    }  # fmt: skip
    out = {}
    for seed, (name, shape) in enumerate(shapes.items()):
        arch = "qwen2-untied" if name == "qwen" else "llama-tied"
        model = tiny_model(arch, seed, vocab_size=len(tokenizer), **shape)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    double = tiny_model("llama-tied", 9, vocab_size=len(tokenizer)).to(torch.float64)
    double.save_pretrained(root / "double")
    tokenizer.save_pretrained(root / "double")
    out["double"] = root / "double"
    return out


def _check(models, name, seq_len=32):
    seed = models["seed"]
    check_expert(name, models[name], read_tokenizer(seed), read_config(seed, "seed"), seq_len)


def test_an_expert_of_the_seeds_family_passes(models):
    _check(models, "same")
    _check(models, "wider")  # another MLP width still stitches (layer by layer, same states)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("short", "has 16 positions, fewer than data.seq_len 32"),
        ("double", "is stored as float64: convert it"),
    ],
)
def test_each_refusal_is_one_line_naming_the_expert_and_the_fix(models, name, message):
    with pytest.raises(BtsError, match=message) as err:
        _check(models, name)
    assert f"pretrained expert '{name}'" in str(err.value) and "\n" not in str(err.value)


def test_another_vocabulary_is_refused(models, tmp_path):
    other = tmp_path / "other"
    tokenizer = train_tokenizer(["entirely different words"] * 30, 280, other)
    tiny_model("llama-tied", 3, vocab_size=len(tokenizer)).save_pretrained(other)
    models = {**models, "other": other}
    with pytest.raises(BtsError, match="uses another tokenizer"):
        _check(models, "other")


def _config(models, experts):
    return parse_config({
        "data": {"domains": ["code", "math"]},
        "seed_model": {"kind": "pretrained", "path": str(models["seed"])},
        "experts": {"domains": [], "pretrained": {n: str(models[n]) for n in experts}},
    })  # fmt: skip


def test_one_shape_baselines_are_left_out_when_an_expert_has_another_shape(models):
    same = _config(models, ["same"])
    assert shape_difference(same) is None
    every = {s.name for s in baseline_systems(same)}
    assert {"linear", "btx_top2", "bam", "btm", "expert_routing"} <= every
    mixed = _config(models, ["same", "wider"])
    assert shape_difference(mixed) == "expert 'wider' has intermediate_size 96 against the seed's 64"
    kept = {s.name for s in baseline_systems(mixed)}
    assert kept == {"btm", "expert_routing"}  # whole models: any shape
    family = _config(models, ["qwen"])
    assert "model_type qwen2" in shape_difference(family)
