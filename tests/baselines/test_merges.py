"""Merge baselines equal their definitions, computed by hand on tiny saved models."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bts.baselines.merges import (
    DEFAULT_MERGES,
    MERGE_METHODS,
    MergeMethod,
    MergeSpec,
    merge_configuration,
    merge_models,
)
from bts.errors import BtsError

from . import branch, save, save_family, tiny_seed


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(path / "model.safetensors").items()}


def assert_all_close(merged: dict, expected: dict, atol: float = 1e-6) -> None:
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=atol, msg=name)


def ties_by_hand(base: torch.Tensor, experts: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al.): trim each delta to its top magnitudes, elect signs by sum, mean agreeing."""
    deltas = torch.stack([expert - base for expert in experts])
    trimmed = torch.zeros_like(deltas)
    keep = max(1, int(density * base.numel()))
    for delta, out in zip(deltas, trimmed, strict=True):
        top = delta.abs().flatten().topk(keep).indices
        out.view(-1)[top] = delta.flatten()[top]
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).double()
    agrees = (torch.sign(trimmed) == elected).double()
    count = agrees.sum(0).clamp(min=1)
    return base + (trimmed * agrees).sum(0) / count


def test_every_method_has_a_builder():
    assert set(get_args(MergeMethod)) == set(MERGE_METHODS)
    assert [spec.method for spec in DEFAULT_MERGES] == list(get_args(MergeMethod))


def test_linear_is_the_mean_of_the_seed_and_the_experts(family, tmp_path):
    seed_dir, experts = family
    out = merge_models(MergeSpec(method="linear"), seed_dir, experts, tmp_path / "soup")
    seed, code, math = (weights(p) for p in (seed_dir, experts["code"], experts["math"]))
    assert_all_close(weights(out), {k: (seed[k] + code[k] + math[k]) / 3 for k in seed})


def test_experts_only_soup_is_the_mean_of_the_experts(family, tmp_path):
    seed_dir, experts = family
    spec = MergeSpec(method="linear", include_seed=False)
    out = merge_models(spec, seed_dir, experts, tmp_path / "soup")
    code, math = weights(experts["code"]), weights(experts["math"])
    assert_all_close(weights(out), {k: (code[k] + math[k]) / 2 for k in code})


def test_soup_configs_list_their_ingredients_with_one_weight(family):
    seed_dir, experts = family
    paths = [str(Path(p).resolve()) for p in (seed_dir, *experts.values())]
    for include_seed, listed in ((True, paths), (False, paths[1:])):
        spec = MergeSpec(method="linear", weight=0.5, include_seed=include_seed)
        config = merge_configuration(spec, seed_dir, experts)
        assert config.merge_method == "linear" and config.base_model is None
        assert [str(m.model.model.path) for m in config.models] == listed
        assert [m.parameters["weight"] for m in config.models] == [0.5] * len(listed)


def test_the_two_soups_have_distinct_system_names():
    assert MergeSpec(method="linear").name == "linear"  # the default keeps its name
    assert MergeSpec(method="linear", include_seed=False).name == "linear_experts"
    assert [spec.name for spec in DEFAULT_MERGES] == [spec.method for spec in DEFAULT_MERGES]


def test_task_arithmetic_adds_scaled_deltas(family, tmp_path):
    seed_dir, experts = family
    spec = MergeSpec(method="task_arithmetic", weight=0.7, lambda_=0.5, normalize=False)
    out = merge_models(spec, seed_dir, experts, tmp_path / "ta")
    seed, code, math = (weights(p) for p in (seed_dir, experts["code"], experts["math"]))
    expected = {
        k: seed[k] + 0.5 * (0.7 * (code[k] - seed[k]) + 0.7 * (math[k] - seed[k])) for k in seed
    }
    assert_all_close(weights(out), expected)


def test_ties_matches_a_hand_implementation(family, tmp_path):
    seed_dir, experts = family
    out = merge_models(MergeSpec(method="ties", density=0.3), seed_dir, experts, tmp_path / "ties")
    seed, code, math = (weights(p) for p in (seed_dir, experts["code"], experts["math"]))
    expected = {k: ties_by_hand(seed[k], [code[k], math[k]], 0.3) for k in seed}
    assert_all_close(weights(out), expected)


def test_dare_ties_is_reproducible_and_random(family, tmp_path):
    seed_dir, experts = family
    spec = MergeSpec(method="dare_ties", density=0.5, random_seed=7)
    out = merge_models(spec, seed_dir, experts, tmp_path / "dare")
    replayed = MergeConfiguration.model_validate(
        yaml.safe_load((out / "mergekit_config.yml").read_text())
    )
    options = MergeOptions(device="cpu", write_model_card=False, random_seed=7, quiet=True)
    run_merge(replayed, str(tmp_path / "replay"), options=options)
    assert_all_close(weights(out), weights(tmp_path / "replay"), atol=0)

    ties = merge_models(MergeSpec(method="ties", density=0.5), seed_dir, experts, tmp_path / "t")
    other = merge_models(
        spec.model_copy(update={"random_seed": 8}), seed_dir, experts, tmp_path / "d"
    )
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights(out)[name], weights(ties)[name])
    assert not torch.equal(weights(out)[name], weights(other)[name])


@pytest.mark.parametrize("spec", DEFAULT_MERGES, ids=lambda spec: spec.method)
def test_default_merges_load_with_tied_embeddings(family, tmp_path, spec):
    seed_dir, experts = family
    out = merge_models(spec, seed_dir, experts, tmp_path / spec.method)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    merged = weights(out)["model.embed_tokens.weight"]
    torch.testing.assert_close(model.lm_head.weight.double(), merged, rtol=0, atol=0)
    ids = AutoTokenizer.from_pretrained(out)("the seed", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_mismatched_expert_is_refused_and_leaves_nothing(family, tmp_path):
    seed_dir, experts = family
    odd = save(branch(tiny_seed(hidden_size=48), 3), tmp_path / "odd")
    before = set(tmp_path.iterdir())
    with pytest.raises(BtsError) as error:
        merge_models(MergeSpec(method="ties"), seed_dir, {**experts, "odd": odd}, tmp_path / "m")
    message = str(error.value)
    assert "'odd' has hidden_size=48 but the seed has 32" in message and "\n" not in message
    assert set(tmp_path.iterdir()) == before


def test_failed_merge_leaves_no_directory(family, tmp_path, monkeypatch):
    seed_dir, experts = family

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("bts.baselines.merges.run_merge", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_models(MergeSpec(method="linear"), seed_dir, experts, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwrite(family, tmp_path):
    seed_dir, experts = family
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(BtsError, match="already exists"):
        merge_models(MergeSpec(method="linear"), seed_dir, experts, out)
    with pytest.raises(BtsError, match="not written by bts"):  # a foreign folder, even so
        merge_models(MergeSpec(method="linear"), seed_dir, experts, out, overwrite=True)
    assert (out / "keep").exists()
    (out / "keep").unlink()
    merge_models(MergeSpec(method="linear"), seed_dir, experts, out)  # empty: written
    first = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(BtsError, match="already exists"):
        merge_models(MergeSpec(method="linear"), seed_dir, experts, out)
    merge_models(MergeSpec(method="linear"), seed_dir, experts, out, overwrite=True)
    assert (out / "model.safetensors").stat().st_mtime_ns != first  # its own output: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_merge_leaves_the_callers_rng_alone(family, tmp_path):
    seed_dir, experts = family
    torch.manual_seed(123)
    state = torch.get_rng_state()
    merge_models(MergeSpec(method="dare_ties"), seed_dir, experts, tmp_path / "m")
    assert torch.equal(torch.get_rng_state(), state)


def test_spec_accepts_yaml_spelling_and_refuses_unused_parameters():
    assert MergeSpec.model_validate({"method": "ties", "lambda": 0.5}).lambda_ == 0.5
    with pytest.raises(ValidationError, match="density applies to"):
        MergeSpec(method="linear", density=0.2)
    with pytest.raises(ValidationError, match="lambda applies to"):
        MergeSpec(method="linear", lambda_=2.0)
    with pytest.raises(ValidationError, match="include_seed=false applies to linear, not ties"):
        MergeSpec(method="ties", include_seed=False)
    dumped = MergeSpec(method="ties").model_dump()  # include_seed=True reloads for every method
    assert MergeSpec.model_validate(dumped) == MergeSpec(method="ties")
    with pytest.raises(ValidationError):
        MergeSpec.model_validate({"method": "ties", "dnesity": 0.2})
