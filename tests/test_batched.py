"""The batched path (bts.batched): constituents as one computation over stacked weights equal
the per-model loop, with caches and gradients, and fall back to the loop where they cannot
stack."""

from __future__ import annotations

import pytest
import torch
from helpers import batch, close, looped_and_batched, randomise_stitches, trained

import bts.batched as batched_module
from bts import BtsError, StitchedModel
from bts.batched import StackedCache


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
