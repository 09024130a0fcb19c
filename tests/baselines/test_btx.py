"""BTX upcycling: expert slots hold the constituents' MLPs, the rest is their mean, routers train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from bts.baselines.btx import BTXSpec, build_btx, load_btx, routers, set_btx_trainable
from bts.errors import BtsError

from . import TINY_LLAMA, branch, save, save_family, tiny_seed

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 120], [9, 9, 31, 2, 77, 45, 100, 1]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # left padding


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def dense(family) -> dict[str, LlamaForCausalLM]:
    """The constituents in expert order (seed first)."""
    seed_dir, experts = family
    paths = {"seed": seed_dir, **experts}
    return {name: LlamaForCausalLM.from_pretrained(path).eval() for name, path in paths.items()}


def test_identical_experts_reproduce_the_seed_whatever_the_routing(tmp_path):
    seed_dir, experts = save_family(tmp_path, scale=0.0)
    seed = LlamaForCausalLM.from_pretrained(seed_dir).eval()
    for k in (1, 2):
        spec = BTXSpec(num_experts_per_tok=k, router_init_std=1.0)
        model = build_btx(spec, seed_dir, experts)
        chosen = model(IDS, output_router_logits=True).router_logits[0].topk(k).indices
        assert chosen.unique().numel() > 1  # tokens really go to different experts
        torch.testing.assert_close(model(IDS).logits, seed(IDS).logits, rtol=0, atol=1e-5)


def test_expert_slots_hold_each_constituents_mlp(family, dense):
    model = build_btx(BTXSpec(), *family)
    assert model.config.btx_experts == list(dense)
    x = torch.randn(10, TINY_LLAMA["hidden_size"])
    for index, constituent in enumerate(dense.values()):
        only = torch.full((10, 1), index)
        for block, dense_block in zip(model.model.layers, constituent.model.layers, strict=True):
            routed = block.mlp.experts(x, top_k_index=only, top_k_weights=torch.ones(10, 1))
            torch.testing.assert_close(routed, dense_block.mlp(x), rtol=0, atol=1e-6)


def test_zero_router_over_all_experts_is_the_mean_mlp(family, dense):
    model = build_btx(BTXSpec(num_experts_per_tok=3, router_init_std=0.0), *family)
    x = torch.randn(1, 10, TINY_LLAMA["hidden_size"])
    for i, block in enumerate(model.model.layers):
        mean = sum(d.model.layers[i].mlp(x) for d in dense.values()) / len(dense)
        torch.testing.assert_close(block.mlp(x), mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("include_seed", [True, False])
def test_other_weights_are_the_constituents_mean(family, dense, include_seed):
    model = build_btx(BTXSpec(include_seed=include_seed), *family)
    mixed = [d for name, d in dense.items() if include_seed or name != "seed"]
    assert model.config.num_local_experts == len(mixed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = [dict(d.named_parameters()) for d in mixed]
    shared = {n: p for n, p in model.named_parameters() if ".mlp." not in n}
    assert shared.keys() == {n for n in params[0] if ".mlp." not in n}
    for name, param in shared.items():
        mean = sum(p[name] for p in params) / len(params)
        torch.testing.assert_close(param, mean, rtol=0, atol=1e-6, msg=name)


def test_router_only_training_counts_and_reaches_only_routers(family):
    model = build_btx(BTXSpec(), *family)
    layers, hidden = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["hidden_size"]
    assert set_btx_trainable(model, train_all=False) == layers * hidden * 3
    model.train()
    model(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for name, param in model.named_parameters():
        is_router = name.endswith("mlp.gate.weight")
        assert param.requires_grad == is_router, name
        assert (param.grad is not None and param.grad.abs().sum() > 0) == is_router, name
    total = sum(p.numel() for p in model.parameters())
    assert set_btx_trainable(model, train_all=True) == total


def test_training_loss_adds_the_load_balancing_loss(family):
    model = build_btx(BTXSpec(aux_loss_coef=0.01), *family)
    model.train()
    out = model(IDS, labels=IDS)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    torch.testing.assert_close(out.loss, lm_loss + 0.01 * out.aux_loss)
    model.eval()
    evaluated = model(IDS, labels=IDS)
    assert evaluated.aux_loss is None
    torch.testing.assert_close(evaluated.loss, lm_loss)


def test_save_load_round_trip_and_generation(family, tmp_path):
    spec = BTXSpec(router_seed=3)
    model = build_btx(spec, *family, out_dir=tmp_path / "btx")
    expected = model(IDS, attention_mask=MASK).logits
    greedy = model.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    assert greedy.shape == (2, IDS.shape[1] + 4)
    config = json.loads((tmp_path / "btx" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert BTXSpec.model_validate_json((tmp_path / "btx" / "btx_spec.json").read_text()) == spec
    assert AutoTokenizer.from_pretrained(tmp_path / "btx")("seed").input_ids
    for loaded in (
        load_btx(tmp_path / "btx"),
        AutoModelForCausalLM.from_pretrained(tmp_path / "btx"),
    ):
        loaded.eval()
        torch.testing.assert_close(
            loaded(IDS, attention_mask=MASK).logits, expected, rtol=0, atol=1e-6
        )
        again = loaded.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
        assert torch.equal(again, greedy)


def test_build_is_reproducible_and_leaves_the_callers_rng_alone(family):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first, second = (build_btx(BTXSpec(router_seed=1), *family) for _ in range(2))
    other = build_btx(BTXSpec(router_seed=2), *family)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(routers(first)[0].weight, routers(second)[0].weight)
    assert not torch.equal(routers(first)[0].weight, routers(other)[0].weight)


def test_bad_inputs_are_refused_before_any_output(family, tmp_path):
    seed_dir, experts = family
    out = tmp_path / "btx"
    with pytest.raises(BtsError, match="num_experts_per_tok=4 exceeds the 3 experts"):
        build_btx(BTXSpec(num_experts_per_tok=4), seed_dir, experts, out)
    with pytest.raises(BtsError, match="named 'seed'"):
        build_btx(BTXSpec(), seed_dir, {"seed": experts["code"]}, out)
    odd = save(branch(tiny_seed(intermediate_size=48), 3), tmp_path / "odd")
    with pytest.raises(BtsError, match="'odd' has intermediate_size=48"):
        build_btx(BTXSpec(), seed_dir, {**experts, "odd": odd}, out)
    biased_seed = save(tiny_seed(mlp_bias=True), tmp_path / "biased")
    with pytest.raises(BtsError, match="mlp_bias=True"):
        build_btx(BTXSpec(), biased_seed, {"b": biased_seed}, out)
    assert not out.exists()
