"""Decoding (bts.generation): speculative greedy equals plain greedy, pruning off changes
nothing and a pruned expert is a removed one, and the inference options validate."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import batch, close, trained

from bts import BtsError
from bts.generation import InferenceOptions, SpeculativeStats, expert_keep_from_gates

# --- speculative decoding --------------------------------------------------------------------


def prompts():
    """Several prompts: one row, a left-padded batch, and a batch with an early EOS."""
    ids, mask = batch(length=9, seed=4)
    return [(ids[:1, 4:], None), (ids, mask)]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_equals_plain_greedy(make_model, arch, batched, k):
    model = trained(make_model, arch)
    model.inference.batched = batched
    for ids, mask in prompts():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=17, assistant_model=None)
        stats = SpeculativeStats()
        fast = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=17,
            assistant_model="hub",
            num_assistant_tokens=k,
            stats=stats,
        )
        assert torch.equal(fast, plain)
        assert stats.verify_steps >= 1 and 0 <= stats.accepted <= stats.drafted


def test_speculative_with_another_drafter_and_eos(make_model):
    model = trained(make_model, "qwen2-untied")
    other = make_model("qwen2-untied", seed=11)  # a poor drafter: most drafts are rejected
    ids, mask = batch(length=9, seed=5)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=20, assistant_model=None)
    eos = int(plain[1, 12])  # a token that ends row 1 early, while others run on
    plain = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, assistant_model=None
    )
    for drafter in (other, "hub"):
        fast = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=20,
            eos_token_id=eos,
            assistant_model=drafter,
            num_assistant_tokens=4,
        )
        assert torch.equal(fast, plain)
    assert (plain[1, 13:] == eos).all()  # padding after EOS (pad = eos by default)


def test_speculative_is_the_default_and_sampling_is_left_alone(make_model):
    model = trained(make_model, "llama-tied")
    ids, mask = batch(length=9)
    stats = SpeculativeStats()
    default = model.generate(ids[:1], max_new_tokens=8, stats=stats)  # batch 1: the hub drafts
    assert InferenceOptions().assistant == "hub" and stats.verify_steps > 0
    assert torch.equal(default, model.generate(ids[:1], max_new_tokens=8, assistant_model=None))
    stats = SpeculativeStats()
    model.generate(ids, attention_mask=mask, max_new_tokens=8, stats=stats)  # a batch: plain
    assert stats.verify_steps == 0
    model.set_inference(assistant_max_batch=8)
    default = model.generate(ids, attention_mask=mask, max_new_tokens=8, stats=stats)
    assert stats.verify_steps > 0
    assert torch.equal(
        default, model.generate(ids, attention_mask=mask, max_new_tokens=8, assistant_model=None)
    )
    gen = torch.Generator().manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=4, do_sample=True, generator=gen)
    assert sampled.shape == (3, 13)
    with pytest.raises(BtsError, match="greedy and cached"):
        model.generate(ids, max_new_tokens=4, do_sample=True, assistant_model="hub")
    with pytest.raises(BtsError, match="unknown"):
        model.generate(ids, max_new_tokens=4, assistant_model="seed")
    with pytest.raises(BtsError, match="vocabulary"):
        model.generate(
            ids, max_new_tokens=4, assistant_model=make_model("llama-tied", vocab_size=50)
        )


# --- pruning ---------------------------------------------------------------------------------


def test_pruning_off_or_keeping_everything_changes_nothing(make_model):
    model = trained(make_model, "llama-tied")
    ids, mask = batch(length=9)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, assistant_model=None)
    for threshold in (None, 0.0):
        for assistant in (None, "hub"):
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=8,
                prune_threshold=threshold,
                assistant_model=assistant,
            )
            assert torch.equal(out, plain)
    with torch.no_grad():
        everything = torch.ones(3, 3, dtype=torch.bool)
        assert torch.equal(model(ids, expert_keep=everything).logits, model(ids).logits)


@pytest.mark.parametrize("batched", [True, False])
def test_pruned_expert_is_exactly_a_removed_expert(make_model, batched):
    model = trained(make_model, "qwen2-untied")
    model.inference.batched = batched
    ids, mask = batch()
    without = copy.deepcopy(model)
    without.remove_expert("e1")
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[:, 1] = False  # e1 off on every row: not run at all
    keep[2, 0] = False  # e0 off on row 2 only
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, expert_keep=keep).logits
        ref = without(ids, attention_mask=mask).logits
        close(ours[:2], ref[:2])
        without.remove_expert("e0")
        close(ours[2], without(ids, attention_mask=mask).logits[2])
    with pytest.raises(BtsError, match="expert_keep has shape"):
        model(ids, expert_keep=keep[:, :2])


def test_pruning_in_generation_follows_the_prompt_gates(make_model):
    model = trained(make_model, "llama-tied")
    ids, mask = batch(length=9)
    with torch.no_grad():
        gates = model(ids, attention_mask=mask, return_gates=True).gates
    keep = expert_keep_from_gates(model, gates, mask, threshold=1.1)  # nothing reaches 1.1
    assert keep.shape == (3, 3) and not keep.any()
    pruned = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, prune_threshold=1.1, assistant_model=None
    )
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=6, prune_threshold=1.1)
    assert torch.equal(fast, pruned)
    # with every expert pruned after the prompt, the continuation is the stitched hub's alone
    hub_only = copy.deepcopy(model)
    first = pruned[:, 9:10]
    with torch.no_grad():
        full = hub_only(
            ids, attention_mask=mask, past_key_values=hub_only.new_cache(), use_cache=True
        )
        assert torch.equal(full.logits[:, -1].argmax(-1), first[:, 0])
        step = hub_only(
            first,
            attention_mask=torch.cat([mask, torch.ones_like(first)], 1),
            past_key_values=full.past_key_values,
            use_cache=True,
            expert_keep=torch.zeros(3, 3, dtype=torch.bool),
        )
    assert torch.equal(step.logits[:, -1].argmax(-1), pruned[:, 10])


def test_set_inference_switches_and_validates(make_model):
    model = trained(make_model, "llama-tied")
    model.set_inference(batched=False, assistant=None, num_assistant_tokens=2, prune_threshold=0.1)
    options = model.inference
    assert (options.batched, options.assistant, options.num_assistant_tokens) == (False, None, 2)
    assert model.inference.prune_threshold == 0.1 and model.batched_reason == "batched is off"
    assert InferenceOptions().assistant == "hub"  # the class default is untouched
    with pytest.raises(BtsError, match="at least 1"):
        model.set_inference(num_assistant_tokens=0)
