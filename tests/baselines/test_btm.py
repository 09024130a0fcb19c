"""BTM output ensemble: posterior weights over constituents, mixture log-probs, greedy decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from bts.baselines.btm import BTMEnsemble, load_btm
from bts.errors import BtsError
from bts.evaluate import held_out_loss

from . import TINY_LLAMA, branch, save_family, tiny_seed

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 120], [9, 9, 31, 2, 77, 45, 100, 1]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # left padding


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return save_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def models() -> dict[str, LlamaForCausalLM]:
    seed = tiny_seed()
    return {"seed": seed, "code": branch(seed, 1, 0.3), "math": branch(seed, 2, 0.3)}


@pytest.fixture(scope="module")
def ensemble(models) -> BTMEnsemble:
    return BTMEnsemble(models)


def uniform_model() -> LlamaForCausalLM:
    """A model whose every next-token distribution is uniform (all-zero output head)."""
    model = tiny_seed(tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_weights_are_a_distribution_starting_at_the_prior(ensemble):
    weights = ensemble.posterior(IDS, attention_mask=MASK)
    assert weights.shape == (2, IDS.shape[1], 3)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, IDS.shape[1]))
    prior = torch.full((3,), 1 / 3)
    torch.testing.assert_close(weights[0, 2], prior)  # first real token of the padded row
    torch.testing.assert_close(weights[1, 0], prior)
    torch.testing.assert_close(weights[0, :2], prior.expand(2, 3))  # padding: nothing seen yet
    assert not torch.allclose(weights[1, -1], prior)  # the context moved the weights


def test_the_model_that_explains_the_context_gains_weight():
    """Greedy tokens of the seed have p_seed >= 1/V everywhere, the uniform model exactly 1/V."""
    seed = tiny_seed()
    ids = seed.generate(IDS[1:, :2], max_new_tokens=10, do_sample=False, eos_token_id=None)
    ensemble = BTMEnsemble({"uniform": uniform_model(), "seed": seed})
    weights = ensemble.posterior(ids)[0, :, 1]
    assert (weights[1:] > 0.5).all() and (weights.diff() >= -1e-6).all()
    # the posterior odds are the likelihood ratio of the context so far
    log_p = seed(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    odds = (log_p + math.log(TINY_LLAMA["vocab_size"])).cumsum(0)
    torch.testing.assert_close(torch.logit(weights[1:].double()), odds.double(), atol=1e-4, rtol=0)


def test_identical_models_reproduce_that_model(models):
    seed = models["seed"]
    ensemble = BTMEnsemble({"a": seed, "b": branch(seed, 0, 0.0)})
    expected = seed(IDS).logits.log_softmax(-1)
    torch.testing.assert_close(ensemble(IDS).logits, expected, atol=1e-5, rtol=0)


def test_loss_is_the_hand_computed_mixture(models, ensemble):
    ids = IDS[1:]
    probs = {n: m(ids).logits.double().softmax(-1)[0] for n, m in models.items()}
    total, evidence = 0.0, {n: 1.0 for n in models}  # prior 1/3 cancels in the normalisation
    for t in range(ids.shape[1] - 1):
        norm = sum(evidence.values())
        nxt = ids[0, t + 1]
        mixture = sum(evidence[n] / norm * probs[n][t, nxt] for n in models)
        total -= math.log(mixture)
        evidence = {n: evidence[n] * probs[n][t, nxt].item() for n in models}
    out = ensemble(ids, labels=ids)
    assert out.loss.item() == pytest.approx(total / (ids.shape[1] - 1), rel=1e-5)
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(1, ids.shape[1]))


def test_left_padded_batch_equals_each_row_alone(ensemble):
    out = ensemble(IDS, attention_mask=MASK)
    for row in range(2):
        real = MASK[row].bool()
        alone = ensemble(IDS[row : row + 1, real])
        torch.testing.assert_close(out.logits[row, real], alone.logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.posterior[row, real], alone.posterior[0], atol=1e-5, rtol=0)
    labels = IDS.masked_fill(MASK == 0, -100)
    assert torch.isfinite(ensemble(IDS, attention_mask=MASK, labels=labels).loss)


def test_greedy_generation_follows_the_mixture(ensemble):
    out = ensemble.generate(IDS, attention_mask=MASK, max_new_tokens=5, eos_token_id=None)
    assert out.shape == (2, IDS.shape[1] + 5)
    assert torch.equal(out[:, : IDS.shape[1]], IDS)
    mask = torch.cat([MASK, torch.ones(2, 5, dtype=torch.long)], 1)
    logits = ensemble(out, attention_mask=mask).logits  # no cache: the reference
    torch.testing.assert_close(logits[:, IDS.shape[1] - 1 : -1].argmax(-1), out[:, IDS.shape[1] :])


def test_generation_stops_at_eos_and_pads(ensemble):
    first = ensemble.generate(IDS, attention_mask=MASK, max_new_tokens=1, eos_token_id=None)
    eos = int(first[0, -1])
    out = ensemble.generate(
        IDS, attention_mask=MASK, max_new_tokens=4, eos_token_id=eos, pad_token_id=0
    )
    assert out[0, IDS.shape[1]] == eos
    assert (out[0, IDS.shape[1] + 1 :] == 0).all()


def test_load_btm_and_active_parameters(family):
    seed_dir, experts = family
    ensemble = load_btm(seed_dir, experts)
    assert ensemble.names == ["seed", "code", "math"]
    assert not any(p.requires_grad for p in ensemble.parameters())
    ensemble.train()
    assert not any(m.training for m in ensemble.models.values())
    per_model = sum(p.numel() for p in ensemble.models["seed"].parameters())
    assert ensemble.active_parameters() == 3 * per_model
    with pytest.raises(BtsError, match="named 'seed'"):
        load_btm(seed_dir, {"seed": experts["code"]})
    with pytest.raises(BtsError, match="no experts"):
        load_btm(seed_dir, {})


def test_evaluation_scores_the_ensemble(ensemble):
    result = held_out_loss(ensemble, IDS, batch_size=1)
    assert result.loss == pytest.approx(ensemble(IDS, labels=IDS).loss.item(), rel=1e-5)
