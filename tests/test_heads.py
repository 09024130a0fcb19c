"""The output stitch (`stitch.output: mixture`): exactly the hub at initialisation, exactly BTM's
posterior at BTM's parameters, cached and speculative decoding exact, removal renormalising,
and round trips through save/load and export."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bts.baselines.btm import BTMEnsemble
from bts.generation import SpeculativeStats
from bts.heads import DECAYS, OutputStitch, _decayed_sum
from bts.hf import BtsStitchedForCausalLM
from bts.models import position_ids
from bts.stitch import StitchedModel, StitchSpec

MIXES = ["prob", "log"]


def heads_model(make_model, arch="llama-tied", mix="prob", n_experts=2, evidence=True, **kw):
    hub = make_model(arch, seed=0)
    experts = {f"e{i}": make_model(arch, seed=i + 1) for i in range(n_experts)}
    options = StitchSpec(gate_dropout=0.0, output="mixture", output_mix=mix,
                            output_evidence=evidence)
    return StitchedModel.from_models(hub, experts, spec=options, **kw).eval()


def randomise(model: StitchedModel, seed: int = 0) -> None:
    """Every stitch parameter moved, as training would; scales kept positive (gates open)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.stitch_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        for stitch in [*model.stitches.values(), model.output]:
            for scale in stitch.scale.values():
                scale.abs_()


def batch(vocab=101, rows=3, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("batched", [False, True])
def test_at_initialisation_the_output_is_exactly_the_hubs(make_model, arch, mix, batched):
    model = heads_model(make_model, arch, mix, batched=batched)
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, return_gates=True)
        hub = model.hub(ids, attention_mask=mask, position_ids=position_ids(ids, mask)).logits
    hub = hub.float().log_softmax(-1)
    assert torch.equal(out.logits, hub)
    output = out.gates[-1]
    assert output.kind == "output" and output.sources == ["hub", "e0", "e1"]
    assert torch.equal(output.weights[..., 0], torch.ones_like(output.weights[..., 0]))


def test_btm_parameters_give_btms_posterior_mixture(make_model):
    model = heads_model(make_model, n_experts=3)
    with torch.no_grad():  # stitch layers at identity, priors 1, whole-context evidence: BTM
        for scale in model.output.scale.values():
            scale.fill_(1.0)
        model.output.evidence_weight.copy_(torch.tensor([1.0, 0.0]))
    assert DECAYS[0] == 1.0
    ids, mask = batch(length=16)
    btm = BTMEnsemble({"seed": model.hub, **model.experts})
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, return_gates=True)
        theirs = btm(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], rtol=0, atol=2e-5)
    torch.testing.assert_close(ours.gates[-1].weights[real], theirs.posterior[real])


def test_decayed_evidence_is_the_recurrence():
    gen = torch.Generator().manual_seed(0)
    scores, start = torch.randn(2, 3, 9, generator=gen), torch.randn(2, 3, generator=gen)
    for decay in DECAYS:
        expected, running = [], start
        for t in range(scores.shape[-1]):
            running = decay * running + scores[..., t]
            expected.append(running)
        torch.testing.assert_close(_decayed_sum(scores, decay, start), torch.stack(expected, -1))


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("batched", [False, True])
def test_cached_decoding_equals_the_full_forward(make_model, arch, mix, batched):
    model = heads_model(make_model, arch, mix, batched=batched)
    randomise(model)
    ids, mask = batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache()
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache,
                       use_cache=True).logits]
        for t in range(5, ids.shape[1], 3):  # chunks of 3 tokens, as speculative verification
            end = min(t + 3, ids.shape[1])
            steps.append(model(ids[:, t:end], attention_mask=mask[:, :end],
                               past_key_values=cache, use_cache=True).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=0, atol=2e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_speculative_greedy_equals_plain_greedy(make_model, batched):
    model = heads_model(make_model, batched=batched)
    randomise(model, seed=3)
    ids = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, assistant_model=None)
    stats = SpeculativeStats()
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=12, assistant_model="hub",
                          num_assistant_tokens=3, stats=stats)
    assert torch.equal(plain, fast)
    assert 0 < stats.verify_steps < 12  # it did verify several drafts at once


def test_removing_an_expert_renormalises_over_the_rest(make_model):
    model = heads_model(make_model, n_experts=3)
    randomise(model, seed=1)
    ids, mask = batch()
    with torch.no_grad():
        model.output.scale["e1"].zero_()  # prior 0 in the mixture is exactly a removed expert
        for stitch in model.stitches.values():
            stitch.scale["e1"].zero_()
        closed = model(ids, attention_mask=mask, return_gates=True)
        model.remove_expert("e1")
        removed = model(ids, attention_mask=mask, return_gates=True)
    torch.testing.assert_close(removed.logits, closed.logits, rtol=0, atol=1e-5)
    weights = removed.gates[-1].weights
    assert removed.gates[-1].sources == ["hub", "e0", "e2"]
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))


def test_an_added_expert_enters_with_weight_zero(make_model):
    model = heads_model(make_model)
    randomise(model, seed=2)
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        model.add_expert("new", make_model("llama-tied", seed=9))
        after = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_gradients_reach_the_output_stitch_and_nothing_frozen(make_model):
    model = heads_model(make_model)
    randomise(model)
    count = model.train_only()
    assert count == sum(p.numel() for p in model.stitch_parameters())
    ids, mask = batch()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    output = dict(model.output.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in output.values())
    frozen = [*model.hub.parameters(), *model.experts.parameters()]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("mix", MIXES)
def test_save_load_and_export_round_trip(make_model, tmp_path, mix):
    model = heads_model(make_model, mix=mix, evidence=mix == "prob")
    randomise(model)
    for name, m in {"hub": model.hub, **model.experts}.items():
        m.save_pretrained(tmp_path / name)
        m.name_or_path = str(tmp_path / name)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "stitched")
    loaded = StitchedModel.from_pretrained(tmp_path / "stitched").eval()
    assert loaded.spec == model.spec
    BtsStitchedForCausalLM.from_stitched(loaded).save_pretrained(tmp_path / "export")
    exported = BtsStitchedForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, expected)
        torch.testing.assert_close(exported(ids, attention_mask=mask).logits, expected)
    assert exported.stitched.spec == model.spec


def test_unknown_mix_is_refused():
    with pytest.raises(Exception, match="output mix 'max' is unknown"):
        OutputStitch(8, [], mix="max")


@pytest.mark.parametrize("mix", MIXES)
def test_training_loss_equals_the_loss_of_the_mixed_logits(make_model, mix):
    """In train mode the probability mix scores only the targets; the loss is the same."""
    model = heads_model(make_model, mix=mix)
    randomise(model)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, labels=labels)
    trained = model.train()(ids, attention_mask=mask, labels=labels)  # no gate dropout here
    assert (trained.logits is None) == (mix == "prob")
    torch.testing.assert_close(trained.loss, full.loss, rtol=0, atol=1e-5)


def test_expert_dropout_closes_experts_per_row_as_a_removal_would(make_model):
    """In training each row's draw closes experts exactly as `expert_keep` (a removal) does;
    a closed expert's parameters get no gradient from that row; eval draws nothing."""
    model = heads_model(make_model, n_experts=3)
    model.spec = replace(model.spec, expert_dropout=0.5)
    randomise(model, seed=3)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(7)
    dropped = model.train()(ids, attention_mask=mask, labels=labels).loss
    torch.manual_seed(7)
    keep = torch.rand(ids.shape[0], 3) >= 0.5
    assert not keep.all() and keep.any()  # this draw closes some experts and keeps others
    closed = model(ids, attention_mask=mask, labels=labels, expert_keep=keep).loss
    assert torch.equal(dropped, closed)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, attention_mask=mask).logits,
                           model(ids, attention_mask=mask, expert_keep=torch.ones_like(keep)).logits)
    # one row whose draw closes e1 and keeps e0: e1 still runs, but gets no gradient
    seed = next(s for s in range(100) if _draw(s, 3).tolist() == [[True, False, True]])
    torch.manual_seed(seed)
    row = slice(2, 3)
    model.train()(ids[row], attention_mask=mask[row], labels=labels[row]).loss.backward()
    assert model.output.scale["e1"].grad.abs().item() == 0
    assert model.output.scale["e0"].grad.abs().item() > 0


def _draw(seed: int, experts: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(1, experts) >= 0.5
