"""Fast inference: batched constituents == the per-model loop, speculative == plain greedy,
pruning off changes nothing, fallback to the loop where constituents cannot stack."""

from __future__ import annotations

import copy

import pytest
import torch
from test_stitch import batch, randomise_stitches, stitched

import bts.batched as batched_module
from bts import BtsError, StitchedModel
from bts.batched import StackedCache
from bts.generation import InferenceOptions, SpeculativeStats, expert_keep_from_gates


def sharp(make_model):
    """Constituents with larger weights than the default init: their attention is far from
    uniform, so a wrong position, mask or cache entry changes the logits visibly."""
    return lambda arch, seed=0, **kw: make_model(
        arch, seed=seed, **{"initializer_range": 0.2, **kw}
    )


def trained(make_model, arch, n_experts=3, **options):
    model = stitched(sharp(make_model), arch, n_experts=n_experts, **options)
    randomise_stitches(model, seed=1)
    return model.eval()


def looped_and_batched(model, fn):
    """fn(model) with the loop, then with the batched path (checked to be the one that ran)."""
    model.inference.batched = False
    reference = fn(model)
    model.inference.batched = True
    assert model.batched_reason is None
    return reference, fn(model)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_stitches", [2, 4])
def test_batched_forward_equals_loop(make_model, arch, num_stitches):
    model = trained(make_model, arch, num_stitches=num_stitches)
    ids, mask = batch()
    with torch.no_grad():
        ref, ours = looped_and_batched(model, lambda m: m(ids, attention_mask=mask).logits)
        close(ours, ref)
        ref, ours = looped_and_batched(model, lambda m: m(ids).logits)
        close(ours, ref)
    assert model.experts["e0"].config.num_key_value_heads < model.config.num_attention_heads


def test_batched_forward_in_row_chunks_equals_loop(make_model, monkeypatch):
    monkeypatch.setattr(batched_module, "_CHUNK_TOKENS", 40)  # 4 models x 12 tokens: 1 row each
    model = trained(make_model, "qwen2-untied")
    ids, mask = batch()
    with torch.no_grad():
        ref, ours = looped_and_batched(
            model, lambda m: m(ids, attention_mask=mask, return_gates=True)
        )
    close(ours.logits, ref.logits)
    for mine, theirs in zip(ours.gates, ref.gates, strict=True):
        assert mine.sources == theirs.sources
        close(mine.weights, theirs.weights)


def test_batched_cache_equals_loop_step_by_step(make_model, arch):
    model = trained(make_model, arch)
    ids, mask = batch(length=14)

    def decode(m):
        cache, logits = m.new_cache(), []
        with torch.no_grad():
            for start, stop in ((0, 9), (9, 10), (10, 13), (13, 14)):  # prompt, 1, 3 (verify), 1
                out = m(
                    ids[:, start:stop],
                    attention_mask=mask[:, :stop],
                    past_key_values=cache,
                    use_cache=True,
                )
                logits.append(out.logits)
        return cache, torch.cat(logits, dim=1)

    (ref_cache, ref), (cache, ours) = looped_and_batched(model, decode)
    assert isinstance(cache, StackedCache) and isinstance(ref_cache, dict)
    close(ours, ref)
    with torch.no_grad():  # and the whole sequence at once
        close(ours, model(ids, attention_mask=mask).logits)


def test_batched_gradients_equal_loop_and_reach_only_stitches(make_model, arch):
    model = trained(make_model, arch, gate_dropout=0.0)
    model.set_inference(batched_training=True)
    model.train_only()
    model.train()
    ids, mask = batch()

    def grads(m):
        m.zero_grad(set_to_none=True)
        m(ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref, ours = looped_and_batched(model, grads)
    assert ours.keys() == ref.keys() and all(n.startswith("stitches.") for n in ours)
    for name in ref:
        close(ours[name], ref[name])
    calls = []
    model.set_inference(batched_training=False)  # the default: training runs the loop
    model.executor.run = lambda *a: calls.append(a)
    grads(model)
    assert not calls


def test_constituents_view_the_stacks_and_stay_consistent(make_model):
    model = trained(make_model, "llama-tied")
    ids, mask = batch()
    with torch.no_grad():
        model(ids)  # builds the stacks
        hub_q = model.hub.model.layers[0].self_attn.q_proj.weight
        expert_q = model.experts["e1"].model.layers[0].self_attn.q_proj.weight
        # one storage for all models: weights are not held twice
        assert hub_q.untyped_storage().data_ptr() == expert_q.untyped_storage().data_ptr()
        # an in-place edit of a constituent is seen by the batched path
        model.experts["e1"].model.layers[1].mlp.down_proj.weight.mul_(1.5)
        ref, ours = looped_and_batched(model, lambda m: m(ids, attention_mask=mask).logits)
        close(ours, ref)
        # replaced tensors (a dtype change) make the stacks rebuild
        model.double()
        ref, ours = looped_and_batched(model, lambda m: m(ids, attention_mask=mask).logits)
        assert ours.dtype == torch.float64
        close(ours, ref)


def test_removed_expert_keeps_its_weights_and_added_expert_is_batched(make_model):
    model = trained(make_model, "llama-tied")
    ids, _ = batch()
    with torch.no_grad():
        model(ids)
        alone_before = model.experts["e2"](ids).logits
        removed = model.experts["e2"]
        model.remove_expert("e2")
        ref, ours = looped_and_batched(model, lambda m: m(ids).logits)
        close(ours, ref)
        assert torch.equal(removed(ids).logits, alone_before)
        model.add_expert("new", make_model("llama-tied", seed=7))
        randomise_stitches(model, seed=3)
        ref, ours = looped_and_batched(model, lambda m: m(ids).logits)
        close(ours, ref)


@pytest.mark.parametrize(
    ("expert", "override", "why"),
    [
        ("llama-tied", {"intermediate_size": 48}, "intermediate_size differs"),
        ("mistral", {"sliding_window": 4}, "sliding-window"),
        ("llama-tied", {"attention_bias": True}, "bias differs"),
    ],
)
def test_mismatched_constituents_fall_back_to_the_loop(make_model, expert, override, why):
    model = StitchedModel.from_models(
        make_model("llama-tied"), {"a": make_model(expert, seed=2, **override)}
    )
    randomise_stitches(model)
    model.eval()
    assert why in model.batched_reason
    assert isinstance(model.new_cache(), dict)
    ids, mask = batch()
    with torch.no_grad():
        model.inference.batched = False
        ref = model(ids, attention_mask=mask).logits
        model.inference.batched = True
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, assistant_model=None)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6), plain)


def test_a_stacked_cache_is_refused_by_the_loop(make_model):
    model = trained(make_model, "llama-tied")
    cache = model.new_cache()
    model.inference.batched = False
    with pytest.raises(BtsError, match="StackedCache belongs to the batched path"):
        model(batch()[0], past_key_values=cache, use_cache=True)


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


def test_generating_first_then_training_works(make_model):
    """Stacks built under inference_mode (generate) must not turn the weights into inference
    tensors: training afterwards needs them for backward."""
    model = trained(make_model, "llama-tied")
    ids, mask = batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert model.batched_reason is None
    model.train_only()
    model.train()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.stitch_parameters())


@pytest.mark.parametrize("name", ["copy", "keys", "pop", "hub", "a.b", ""])
def test_expert_names_that_cannot_be_keys_are_refused(make_model, name):
    model = trained(make_model, "llama-tied", n_experts=1)
    with pytest.raises(BtsError, match="is not allowed"):
        model.add_expert(name, make_model(seed=7))
