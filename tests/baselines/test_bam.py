"""BAM: attention experts mixed by soft routers, FFN experts as in BTX, the rest averaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from bts.baselines.bam import (
    BAMForCausalLM,
    BAMSpec,
    active_parameters,
    attention_routers,
    build_bam,
    load_bam,
    output_adapters,
    set_bam_trainable,
)
from bts.baselines.btx import BTXSpec, build_btx, routers
from bts.errors import BtsError

from . import TINY_LLAMA, save_family

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 120], [9, 9, 31, 2, 77, 45, 100, 1]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # left padding
N_EXPERTS = 3  # seed + code + math


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"), scale=0.2)


@pytest.fixture(scope="module")
def dense(family) -> list[LlamaForCausalLM]:
    """The constituents in expert order (seed first)."""
    seed_dir, experts = family
    return [LlamaForCausalLM.from_pretrained(p).eval() for p in (seed_dir, *experts.values())]


@pytest.fixture(scope="module")
def bam(family) -> BAMForCausalLM:
    return build_bam(BAMSpec(router_init_std=1.0), *family)


def rope(model, x: torch.Tensor):
    return model.model.rotary_emb(x, torch.arange(x.shape[1])[None])


@pytest.mark.parametrize("ffn_routing", ["top2", "soft", "top1"])
def test_identical_constituents_reproduce_the_seed(tmp_path, ffn_routing):
    seed_dir, experts = save_family(tmp_path, scale=0.0)
    seed = LlamaForCausalLM.from_pretrained(seed_dir).eval()
    model = build_bam(BAMSpec(ffn_routing=ffn_routing, router_init_std=1.0), seed_dir, experts)
    expected = seed(IDS, attention_mask=MASK).logits
    for training in (False, True):
        got = model.train(training)(IDS, attention_mask=MASK).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_attention_is_the_router_weighted_sum_of_the_constituents_attention(bam, dense):
    x = torch.randn(2, 6, TINY_LLAMA["hidden_size"])
    cos_sin = rope(bam, x)
    for i, block in enumerate(bam.model.layers):
        weights = block.self_attn.router(x)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6))
        assert (weights > 0).all() and weights.std() > 0.01  # not uniform: every expert counts
        outs = [d.model.layers[i].self_attn(x, cos_sin, None)[0] for d in dense]
        expected = sum(weights[..., e : e + 1] * out for e, out in enumerate(outs))
        got, _ = block.self_attn(x, cos_sin, None)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_ffn_experts_and_shared_weights_come_from_the_constituents(bam, dense):
    assert bam.config.btx_experts == ["seed", "code", "math"]
    assert bam.config.bam_attention_experts == N_EXPERTS
    x = torch.randn(10, TINY_LLAMA["hidden_size"])
    for e, constituent in enumerate(dense):
        only = torch.full((10, 1), e)
        for block, dense_block in zip(bam.model.layers, constituent.model.layers, strict=True):
            routed = block.mlp.experts(x, top_k_index=only, top_k_weights=torch.ones(10, 1))
            torch.testing.assert_close(routed, dense_block.mlp(x), rtol=0, atol=1e-6)
    params = [dict(d.named_parameters()) for d in dense]
    for name, param in bam.named_parameters():
        if ".mlp." not in name and ".self_attn." not in name:
            mean = sum(p[name] for p in params) / len(params)
            torch.testing.assert_close(param, mean, rtol=0, atol=1e-6, msg=name)
    assert bam.lm_head.weight is bam.model.embed_tokens.weight


def greedy_without_cache(model, ids, mask, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence at every step (no KV cache)."""
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_cached_generation_equals_recomputation(bam):
    ids = IDS[1:]  # no padding: recomputation and generate then see the same positions
    cached = bam.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
    )
    assert torch.equal(cached, greedy_without_cache(bam, ids, torch.ones_like(ids), 6))
    assert cached[0, ids.shape[1] :].unique().numel() > 1  # a non-degenerate continuation
    out = bam(ids, use_cache=True)
    assert len(out.past_key_values.layers) == TINY_LLAMA["num_hidden_layers"] * N_EXPERTS


def test_cached_generation_with_left_padding(bam):
    cached = bam.generate(IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(bam, IDS, MASK, 5))


def test_save_load_round_trip(family, tmp_path):
    spec = BAMSpec(ffn_routing="top1", router_seed=3)
    model = build_bam(spec, *family, out_dir=tmp_path / "bam")
    expected = model(IDS, attention_mask=MASK).logits
    greedy = model.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    config = json.loads((tmp_path / "bam" / "config.json").read_text())
    assert config["model_type"] == "bts_bam" and config["architectures"] == ["BAMForCausalLM"]
    assert config["btx_routing"] == "top1"
    assert BAMSpec.model_validate_json((tmp_path / "bam" / "bam_spec.json").read_text()) == spec
    assert (tmp_path / "bam" / "model.safetensors").is_file()
    for loaded in (
        load_bam(tmp_path / "bam"),
        AutoModelForCausalLM.from_pretrained(tmp_path / "bam"),
    ):
        assert isinstance(loaded, BAMForCausalLM)
        loaded.eval()
        torch.testing.assert_close(
            loaded(IDS, attention_mask=MASK).logits, expected, rtol=0, atol=1e-6
        )
        again = loaded.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
        assert torch.equal(again, greedy)


def test_training_loss_and_gradients_reach_both_kinds_of_router(family):
    model = build_bam(BAMSpec(ffn_routing="top2", aux_loss_coef=0.01), *family).train()
    out = model(IDS, labels=IDS)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
    assert out.aux_loss > 0 and len(out.router_logits) == TINY_LLAMA["num_hidden_layers"]
    torch.testing.assert_close(out.loss, lm_loss + 0.01 * out.aux_loss)
    out.loss.backward()
    for router in routers(model) + attention_routers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    model.eval()
    assert model(IDS, labels=IDS).aux_loss is None


def test_router_only_training_and_parameter_counts(bam, family, dense):
    layers, hidden = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["hidden_size"]
    assert set_bam_trainable(bam, train_all=False) == 2 * layers * hidden * N_EXPERTS
    total = sum(p.numel() for p in bam.parameters())
    assert set_bam_trainable(bam, train_all=True) == total
    assert active_parameters(bam) == total  # soft, the default: every FFN expert runs
    top2 = build_bam(BAMSpec(ffn_routing="top2"), *family)
    mlp = sum(p.numel() for p in dense[0].model.layers[0].mlp.parameters())
    assert active_parameters(top2) == total - layers * mlp  # top-2 of 3 FFN experts


def test_soft_ffn_routing_is_the_default_and_its_dump_reloads():
    spec = BAMSpec()
    assert spec.ffn_routing == "soft" and not spec.adapters
    assert BAMSpec.model_validate(spec.model_dump()) == spec  # num_experts_per_tok=2 accepted
    assert BAMSpec.model_validate_json(spec.model_dump_json()) == spec


ADAPTER_SPEC = BAMSpec(ffn_routing="soft", train_all=False, adapters=True, router_init_std=1.0)


@pytest.fixture(scope="module")
def adapted(family) -> BAMForCausalLM:
    return build_bam(ADAPTER_SPEC, *family)


def test_identity_adapters_give_exactly_plain_frozen_bam(family, adapted):
    plain = build_bam(ADAPTER_SPEC.model_copy(update={"adapters": False}), *family)
    # one adapter per attention expert and per FFN expert in every block
    n_adapters = [a.weight.shape[0] for a in output_adapters(adapted)]
    assert n_adapters == [N_EXPERTS] * 2 * TINY_LLAMA["num_hidden_layers"]
    assert output_adapters(plain) == []
    x = torch.randint(
        0, TINY_LLAMA["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(4)
    )
    for training in (False, True):
        got = adapted.train(training)(x).logits
        torch.testing.assert_close(got, plain.train(training)(x).logits, rtol=0, atol=0)
    adapted.eval()
    for kind in ("self_attn", "mlp"):  # changing either kind of adapter changes the output
        chosen = [m for n, m in adapted.named_modules() if n.endswith(f"{kind}.adapters")]
        assert len(chosen) == TINY_LLAMA["num_hidden_layers"]
        with torch.no_grad():
            for adapter in chosen:
                adapter.weight.mul_(1.1)
            assert not torch.allclose(adapted(x).logits, plain(x).logits), kind
            for adapter in chosen:
                adapter.weight.copy_(torch.eye(adapter.weight.shape[-1]))


@pytest.mark.parametrize("ffn_routing", ["soft", "top2"])
def test_only_routers_and_adapters_train(family, ffn_routing):
    spec = ADAPTER_SPEC.model_copy(update={"ffn_routing": ffn_routing})
    model = build_bam(spec, *family).train()
    layers, hidden = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["hidden_size"]
    routers_and_adapters = 2 * layers * N_EXPERTS * (hidden + hidden * hidden)
    assert set_bam_trainable(model, spec.train_all) == routers_and_adapters
    trained = {id(p) for m in output_adapters(model) for p in m.parameters()}
    trained |= {id(p) for m in routers(model) + attention_routers(model) for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trained
    model(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for name, param in model.named_parameters():
        if id(param) in trained:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    with pytest.raises(BtsError, match="trains only its routers and adapters"):
        set_bam_trainable(model, train_all=True)


def test_adapter_bam_save_load_round_trip(family, tmp_path):
    model = build_bam(ADAPTER_SPEC, *family)
    with torch.no_grad():  # trained-looking adapters, so a reload at identity would show
        for i, adapter in enumerate(output_adapters(model)):
            noise = torch.randn(adapter.weight.shape, generator=torch.Generator().manual_seed(i))
            adapter.weight.add_(0.1 * noise)
    model.save_pretrained(tmp_path / "bam")
    config = json.loads((tmp_path / "bam" / "config.json").read_text())
    assert config["bam_adapters"] is True
    loaded = load_bam(tmp_path / "bam").eval()
    for ours, theirs in zip(output_adapters(model), output_adapters(loaded), strict=True):
        assert torch.equal(ours.weight, theirs.weight)
    expected = model(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(loaded(IDS, attention_mask=MASK).logits, expected, rtol=0, atol=0)
    greedy = model.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    again = loaded.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=False)
    assert torch.equal(again, greedy)


def test_adapters_with_every_weight_trained_are_refused():
    with pytest.raises(ValidationError, match="set train_all: false") as error:
        BAMSpec(adapters=True, train_all=True)
    assert "\n" not in str(error.value.errors()[0]["msg"])
    with pytest.raises(ValidationError, match="set train_all: false"):
        BAMSpec(adapters=True)  # train_all defaults to true (plain BAM)


def test_build_is_reproducible_and_leaves_the_callers_rng_alone(family):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first, second = (build_bam(BAMSpec(router_seed=1), *family) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(attention_routers(first), attention_routers(second), strict=True):
        assert torch.equal(a.weight, b.weight)
    torch.testing.assert_close(first(IDS).logits, second(IDS).logits, rtol=0, atol=0)


def test_bad_inputs_are_refused(family, tmp_path):
    seed_dir, experts = family
    with pytest.raises(BtsError, match="num_experts_per_tok=4 exceeds the 3 experts"):
        build_bam(
            BAMSpec(ffn_routing="top2", num_experts_per_tok=4), seed_dir, experts, tmp_path / "bam"
        )
    assert not (tmp_path / "bam").exists()
    with pytest.raises(ValidationError, match="=3 applies to ffn_routing='top2' only"):
        BAMSpec(ffn_routing="soft", num_experts_per_tok=3)
    build_btx(BTXSpec(), seed_dir, experts, tmp_path / "btx")
    with pytest.raises(BtsError, match="'mixtral' model, not BAM"):
        load_bam(tmp_path / "btx")
