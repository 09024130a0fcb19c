"""Expert routing: lowest-loss targets, router-only training, exact routed logits, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bts.baselines.routing import (
    MANIFEST,
    WEIGHTS,
    RoutedModel,
    RouterTrainer,
    RoutingSpec,
    build_routing,
    draw_prefix,
    load_routing,
    save_routing,
)
from bts.errors import BtsError
from bts.evaluate import held_out_loss
from bts.train import TrainConfig, train

from . import branch, save, tiny_seed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEQ = 32
HALF = 64  # domain "low" uses tokens [0, 64), domain "high" tokens [64, 128)
SPEC = RoutingSpec(min_prefix=8, max_prefix=SEQ, eval_prefix=16)
CFG = TrainConfig(steps=6, lr=0.1, warmup_steps=0, checkpoint_every=2, log_every=1, seed=1)


def domain_batch(index: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of uniform tokens from one domain each (half each, shuffled); and which domain."""
    generator = torch.Generator().manual_seed(1000 + index)
    domain = torch.randperm(rows, generator=generator) % 2
    ids = torch.randint(0, HALF, (rows, SEQ), generator=generator) + HALF * domain[:, None]
    return ids, domain


def batches(index: int) -> torch.Tensor:
    return domain_batch(index)[0]


def specialise(model, domain: int, steps: int = 30):
    """Continue training a copy on one domain until it clearly beats the seed there."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(domain)
    for _ in range(steps):
        ids = torch.randint(0, HALF, (8, SEQ), generator=generator) + HALF * domain
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A seed and two experts, each clearly best on its own token range."""
    root = tmp_path_factory.mktemp("routing")
    # untied: with a tied head, training on one half also teaches "continue in the half you
    # see", and each expert ends up as good as the other on both halves
    seed = tiny_seed(tie_word_embeddings=False)
    seed_dir = save(seed, root / "seed")
    experts = {
        name: save(specialise(branch(seed, i + 1, 0.0), i), root / name)
        for i, name in enumerate(("low", "high"))
    }
    return seed_dir, experts


@pytest.fixture(scope="module")
def trained(family, tmp_path_factory) -> RouterTrainer:
    trainer = build_routing(SPEC, *family)
    train(trainer, batches, CFG, tmp_path_factory.mktemp("train"))
    return trainer


def accuracy(model: RoutedModel, index: int = 99) -> float:
    ids, domain = domain_batch(index, rows=32)
    return (model.route(ids) == domain + 1).float().mean().item()  # expert d is constituent d+1


def test_targets_are_the_lowest_loss_model(family):
    trainer = build_routing(SPEC, *family)
    ids = torch.cat([domain_batch(0)[0], torch.randint(0, 128, (2, SEQ))])
    mask = torch.ones_like(ids)
    mask[-1, :5] = 0  # left padding is not scored
    labels = ids.masked_fill(mask == 0, -100)
    losses = torch.stack(
        [
            torch.stack(
                [
                    F.cross_entropy(m(ids[r : r + 1]).logits[0, :-1], ids[r, 1:])
                    if r < len(ids) - 1
                    else F.cross_entropy(
                        m(ids[r : r + 1], attention_mask=mask[r : r + 1]).logits[0, 4:-1],
                        ids[r, 5:],
                    )
                    for r in range(len(ids))
                ]
            )
            for m in trainer.models.values()
        ],
        -1,
    )
    assert torch.equal(trainer.targets(ids, mask, labels), losses.argmin(-1))
    _, domain = domain_batch(0)
    assert torch.equal(trainer.targets(ids[:8], torch.ones_like(ids[:8])), domain + 1)


def test_only_the_router_trains(family):
    trainer = build_routing(SPEC, *family)
    assert trainer.names == ["seed", "low", "high"]
    trainable = {n for n, p in trainer.named_parameters() if p.requires_grad}
    assert trainable == {"router.weight", "router.bias"}
    trainer.train()
    assert not any(m.training for m in trainer.models.values())
    out = trainer(input_ids=batches(0), labels=batches(0))
    assert out.logits.shape == (8, 3) and 8 <= out.prefix <= SEQ
    torch.testing.assert_close(out.loss, torch.log(torch.tensor(3.0)))  # zero router: uniform
    per_model = sum(p.numel() for p in trainer.models["seed"].parameters())
    assert trainer.active_parameters() == per_model + 32 * 3 + 3


def test_prefix_draw_is_a_function_of_seed_and_batch():
    draws = {draw_prefix(SPEC, batches(i)) for i in range(50)}
    assert min(draws) >= 8 and max(draws) <= SEQ and len(draws) > 10
    assert draw_prefix(SPEC, batches(3)) == draw_prefix(SPEC, batches(3).clone())
    other = SPEC.model_copy(update={"seed": 1})
    assert [draw_prefix(other, batches(i)) for i in range(20)] != [
        draw_prefix(SPEC, batches(i)) for i in range(20)
    ]
    assert draw_prefix(RoutingSpec(), batches(0)) == SEQ  # clamped to the sequence length


def test_router_reads_only_the_prefix(trained):
    ids = batches(0)
    changed = ids.clone()
    changed[:, 16:] = 127 - changed[:, 16:]
    mask = torch.ones_like(ids)
    torch.testing.assert_close(
        trained.router_logits(ids, mask, 16), trained.router_logits(changed, mask, 16)
    )
    assert not torch.allclose(
        trained.router_logits(ids, mask, 17), trained.router_logits(changed, mask, 17)
    )


def test_training_teaches_the_router_the_domains(family, trained):
    assert accuracy(build_routing(SPEC, *family).routed()) == 0.0  # all-zero router: the seed
    assert accuracy(trained.routed()) >= 0.85  # 0.97 here


def test_routed_logits_are_the_chosen_models_exactly(trained):
    """Causal: each position's logits are, bit for bit, those of the model routed on the real
    tokens up to it; after eval_prefix real tokens every row keeps one model."""
    routed = trained.routed()
    ids = torch.cat([batches(5), batches(6)[:3]])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = routed(ids, attention_mask=mask, labels=ids)
    assert out.routes.shape == ids.shape
    assert torch.equal(out.routes, routed.causal_routes(ids, mask))
    assert len(out.routes.unique()) >= 2
    assert torch.equal(out.routes[1:, SPEC.eval_prefix - 1 :],
                       routed.route(ids, mask)[1:, None].expand(-1, SEQ - SPEC.eval_prefix + 1))
    for index, name in enumerate(routed.names):
        chosen = routed.models[name](input_ids=ids, attention_mask=mask).logits
        where = out.routes == index
        assert torch.equal(out.logits[where], chosen[where])
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    full = routed(ids, labels=ids).loss.item()
    assert held_out_loss(routed, ids, batch_size=4).loss == pytest.approx(full, rel=1e-5)


def test_routed_logits_never_read_later_tokens(trained):
    """Position t's logits stay put when every token after t changes (a causal LM)."""
    routed = trained.routed()
    ids = batches(8)
    for t in (0, 5, SPEC.eval_prefix - 1):
        changed = ids.clone()
        changed[:, t + 1 :] = 127 - changed[:, t + 1 :]
        torch.testing.assert_close(
            routed(changed).logits[:, : t + 1], routed(ids).logits[:, : t + 1], rtol=0, atol=1e-6
        )


def test_non_causal_routing_scores_each_row_with_one_model(trained):
    spec = SPEC.model_copy(update={"causal": False})
    routed = RoutedModel(spec, dict(trained.models.items()), trained.router)
    ids = batches(5)
    out = routed(ids)
    assert torch.equal(out.routes, routed.route(ids))
    for row, index in enumerate(out.routes.tolist()):
        alone = routed.models[routed.names[index]](input_ids=ids[row : row + 1]).logits
        assert torch.equal(out.logits[row : row + 1], alone)


def test_generate_uses_the_chosen_models_own_generate(trained):
    routed = trained.routed()
    ids = batches(7)[:4, :20]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = routed.generate(
        ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0
    )
    assert out.shape == (4, 24) and torch.equal(out[:, :20], ids)
    routes = routed.route(ids, mask)
    for row in range(4):
        model = routed.models[routed.names[routes[row]]]
        alone = model.generate(
            ids[row : row + 1, mask[row].bool()],
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert torch.equal(out[row, 20:], alone[0, -4:])


def test_save_load_round_trip(trained, family, tmp_path):
    save_routing(trained, tmp_path / "router")
    info = json.loads((tmp_path / "router" / MANIFEST).read_text())
    assert info["names"] == ["seed", "low", "high"]
    assert all(not Path(e["path"]).is_absolute() for e in info["constituents"].values())
    assert RoutingSpec.model_validate(info["spec"]) == SPEC
    loaded = load_routing(tmp_path / "router")
    ids = domain_batch(42, rows=16)[0]
    assert torch.equal(loaded.route(ids), trained.routed().route(ids))
    weights = load_file(tmp_path / "router" / WEIGHTS)
    assert torch.equal(weights["weight"], trained.router.weight)
    save_routing(loaded, tmp_path / "again")  # a loaded model saves the same router
    assert load_file(tmp_path / "again" / WEIGHTS).keys() == weights.keys()


def test_resumed_training_equals_uninterrupted(family, trained, tmp_path):
    first = train(build_routing(SPEC, *family), batches, CFG, tmp_path, stop_after=3)
    assert first.steps == 3
    resumed = build_routing(SPEC, *family)
    train(resumed, batches, CFG, tmp_path)
    for name, param in trained.router.state_dict().items():
        assert torch.equal(resumed.router.state_dict()[name], param), name


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_directories_are_one_line_errors(trained, family, tmp_path):
    with pytest.raises(BtsError, match="not found") as err:
        load_routing(tmp_path / "nothing")
    _one_line(err)
    out = tmp_path / "router"
    save_routing(trained, out)
    manifest = (out / MANIFEST).read_text()
    (out / WEIGHTS).write_bytes((out / WEIGHTS).read_bytes()[:20])
    with pytest.raises(BtsError, match="corrupt") as err:
        load_routing(out)
    _one_line(err)
    for broken in ("{", json.dumps({**json.loads(manifest), "spec": {"min_prefix": 0}})):
        (out / MANIFEST).write_text(broken)
        with pytest.raises(BtsError, match="corrupt") as err:
            load_routing(out)
        _one_line(err)


def test_changed_constituent_is_refused(tmp_path):
    seed = tiny_seed()
    seed_dir = save(seed, tmp_path / "seed")
    expert_dir = save(branch(seed, 1), tmp_path / "code")
    save_routing(build_routing(SPEC, seed_dir, {"code": expert_dir}), tmp_path / "router")
    save(branch(seed, 2), expert_dir)
    with pytest.raises(BtsError, match="'code'.*changed since the router was trained") as err:
        load_routing(tmp_path / "router")
    _one_line(err)


def test_bad_specs_and_names(family):
    with pytest.raises(ValueError, match="min_prefix"):
        RoutingSpec(min_prefix=64, max_prefix=32)
    with pytest.raises(BtsError, match="named 'seed'"):
        build_routing(SPEC, family[0], {"seed": family[1]["low"]})
    with pytest.raises(BtsError, match="no experts"):
        build_routing(SPEC, family[0], {})
