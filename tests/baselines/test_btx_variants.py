"""BTX routing variants: top2 (BTX), soft (BTS paper's BTX-soft), top1 (BTX-sample, Gumbel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralConfig

from bts.baselines.btx import (
    BTXSpec,
    GumbelTop1Router,
    SoftRouter,
    active_parameters,
    build_btx,
    load_btx,
    routers,
)

from . import TINY_LLAMA, save_family

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 120], [9, 9, 31, 2, 77, 45, 100, 1]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # left padding
VARIANTS = ("top2", "soft", "top1")
N_EXPERTS = 3  # seed + code + math


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def dense(family) -> list[LlamaForCausalLM]:
    """The constituents in expert order (seed first)."""
    seed_dir, experts = family
    return [LlamaForCausalLM.from_pretrained(p).eval() for p in (seed_dir, *experts.values())]


def spec(routing: str, **kwargs) -> BTXSpec:
    return BTXSpec(routing=routing, router_init_std=1.0, **kwargs)  # spread tokens over experts


def routing_weights(model, ids=IDS) -> list[torch.Tensor]:
    """Per block, the (tokens, experts) weights the experts received (zero where not routed)."""
    seen = []

    def record(module, args):
        _, index, weights = args
        dense = torch.zeros(index.shape[0], module.num_experts)
        seen.append(dense.scatter_add(1, index, weights.detach().float()))

    hooks = [layer.mlp.experts.register_forward_pre_hook(record) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("routing,k", [("top2", 2), ("top1", 1)])
@pytest.mark.parametrize("training", [False, True])
def test_sparse_variants_route_each_token_to_exactly_k_experts(family, routing, k, training):
    model = build_btx(spec(routing), *family).train(training)
    assert model.config.num_experts_per_tok == k
    for weights in routing_weights(model):
        assert ((weights != 0).sum(-1) == k).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))
        assert (weights != 0).any(0).sum() > 1  # tokens really go to different experts


def test_top1_forward_weight_is_exactly_one(family):
    model = build_btx(spec("top1"), *family).train()
    for weights in routing_weights(model):
        assert torch.equal(weights.max(-1).values, torch.ones(len(weights)))


def test_soft_routing_weights_every_expert_by_the_softmax(family, dense):
    model = build_btx(spec("soft"), *family)
    assert isinstance(routers(model)[0], SoftRouter)
    for weights in routing_weights(model):
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))
    x = torch.randn(1, 10, TINY_LLAMA["hidden_size"])
    for i, block in enumerate(model.model.layers):
        probs = torch.softmax(F.linear(x, block.mlp.gate.weight), -1)
        expected = sum(
            probs[..., e : e + 1] * d.model.layers[i].mlp(x) for e, d in enumerate(dense)
        )
        torch.testing.assert_close(block.mlp(x), expected, rtol=0, atol=1e-6)


def test_top1_samples_from_the_router_softmax_in_training_and_takes_the_argmax_in_eval():
    config = MixtralConfig(hidden_size=4, num_local_experts=3, num_experts_per_tok=1)
    router = GumbelTop1Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]]))
    x = torch.tensor([[0.5, 1.5, 0.0, 0.0]]).expand(20000, -1)
    expected = torch.softmax(F.linear(x[:1], router.weight), -1)[0]
    router.train()
    torch.manual_seed(0)
    _, weights, first = router(x)
    torch.manual_seed(1)
    _, _, second = router(x)
    assert not torch.equal(first, second)  # different seeds, different samples
    assert torch.equal(weights, torch.ones(20000, 1))
    frequency = torch.bincount(first[:, 0], minlength=3) / 20000
    torch.testing.assert_close(frequency, expected.detach(), rtol=0, atol=0.02)
    router.eval()
    _, weights, index = router(x)
    assert (index == expected.argmax()).all() and (weights == 1).all()


def test_top1_temperature_is_configurable_and_stored(family):
    model = build_btx(spec("top1", gumbel_temperature=0.3), *family)
    assert model.config.btx_gumbel_temperature == 0.3
    assert all(isinstance(r, GumbelTop1Router) and r.temperature == 0.3 for r in routers(model))


@pytest.mark.parametrize("routing", VARIANTS)
def test_identical_experts_reproduce_the_seed_in_every_variant(tmp_path, routing):
    seed_dir, experts = save_family(tmp_path, scale=0.0)
    seed = LlamaForCausalLM.from_pretrained(seed_dir).eval()
    model = build_btx(spec(routing), seed_dir, experts)
    expected = seed(IDS, attention_mask=MASK).logits
    for training in (False, True):  # training mode samples for top1; no dropout in these models
        got = model.train(training)(IDS, attention_mask=MASK).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("routing", VARIANTS)
def test_save_load_keeps_the_variant_and_the_logits(family, tmp_path, routing):
    model = build_btx(spec(routing), *family, out_dir=tmp_path / "btx")
    expected = model(IDS, attention_mask=MASK).logits
    greedy = model.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    loaded = load_btx(tmp_path / "btx").eval()
    assert loaded.config.btx_routing == routing
    assert [type(r) for r in routers(loaded)] == [type(r) for r in routers(model)]
    # A plain Mixtral reload evaluates identically: num_experts_per_tok is 1 (top1) or all (soft).
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "btx").eval()
    for other in (loaded, plain):
        logits = other(IDS, attention_mask=MASK).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
        again = other.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
        assert torch.equal(again, greedy)


@pytest.mark.parametrize("routing", VARIANTS)
def test_gradient_reaches_every_router(family, routing):
    model = build_btx(spec(routing), *family).train()
    model(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for router in routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("routing,has_aux", [("top2", True), ("top1", True), ("soft", False)])
def test_load_balancing_loss_in_training_except_for_soft(family, routing, has_aux):
    model = build_btx(spec(routing, aux_loss_coef=0.01), *family).train()
    torch.manual_seed(0)
    out = model(IDS, labels=IDS)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
    assert (out.aux_loss is not None) == has_aux
    extra = 0.01 * out.aux_loss if has_aux else 0.0
    torch.testing.assert_close(out.loss, lm_loss + extra)


def test_active_parameters_count_the_routed_experts_only(family, dense):
    dense_params = sum(p.numel() for p in dense[0].parameters())
    layers, hidden = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["hidden_size"]
    router_params = layers * hidden * N_EXPERTS
    mlp = sum(p.numel() for p in dense[0].model.layers[0].mlp.parameters())
    top1, top2, soft = (build_btx(spec(r), *family) for r in ("top1", "top2", "soft"))
    assert active_parameters(top1) == dense_params + router_params
    assert active_parameters(top2) == dense_params + router_params + layers * mlp
    assert active_parameters(soft) == sum(p.numel() for p in soft.parameters())
    assert active_parameters(soft) == dense_params + router_params + 2 * layers * mlp


def test_num_experts_per_tok_is_refused_outside_top2():
    assert BTXSpec().routing == "top2"  # default: the behaviour before variants existed
    for routing in ("soft", "top1"):
        with pytest.raises(ValidationError, match="=3 applies to routing='top2' only"):
            BTXSpec(routing=routing, num_experts_per_tok=3)
        dumped = BTXSpec(routing=routing, num_experts_per_tok=2)  # the default reloads
        assert BTXSpec.model_validate_json(dumped.model_dump_json()) == dumped
