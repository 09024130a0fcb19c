"""The training loop: exact resume, frozen parameters, atomic checkpoints, stability guard, DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from ddp_worker import DDP_CFG, VOCAB, batches, tiny_llama, trainable

import bts.train as bt
from bts.errors import BtsError
from bts.train import TrainConfig, TrainResult, _Progress, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CFG = TrainConfig(
    steps=6, lr=1e-2, warmup_steps=2, grad_accum=2, checkpoint_every=2, log_every=1, seed=3
)
DROPOUT = 0.1  # makes resume equality depend on restoring the RNG states
POISON = VOCAB - 1  # a token that marks a poisoned micro-batch


def step_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def skip_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "skip"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of CFG: (final weights, per-step losses, result)."""
    out = tmp_path_factory.mktemp("straight")
    model = tiny_llama(dropout=DROPOUT)
    result = train(model, batches(), CFG, out)
    return trainable(model), [r["loss"] for r in step_records(out)], result


def test_resume_equals_straight_run(straight, tmp_path):
    weights, losses, result = straight
    first = train(tiny_llama(dropout=DROPOUT), batches(), CFG, tmp_path, stop_after=3)
    assert first.steps == 3
    assert not (tmp_path / "train_result.json").exists()
    model = tiny_llama(
        seed=99, dropout=DROPOUT
    )  # a fresh object: everything trainable comes from the checkpoint
    resumed = train(model, batches(), CFG, tmp_path)
    assert_same_weights(trainable(model), weights)
    assert [r["loss"] for r in step_records(tmp_path)] == losses
    assert [r["step"] for r in step_records(tmp_path)] == list(range(1, 7))
    assert resumed.tokens == result.tokens == 6 * 2 * 4 * 16
    assert resumed.final_loss == result.final_loss == losses[-1]
    saved = TrainResult(**json.loads((tmp_path / "train_result.json").read_text()))
    assert saved.model_dump() == {**resumed.model_dump(), "seconds": saved.seconds}


def test_schedule_is_warmup_then_cosine_and_follows_a_changed_lr(tmp_path):
    train(tiny_llama(), batches(), CFG, tmp_path, stop_after=3)
    lrs = [r["lr"] for r in step_records(tmp_path)]
    assert lrs[:3] == [0.0, CFG.lr / 2, CFG.lr]  # linear warmup over 2 steps from 0
    lower = CFG.model_copy(update={"lr": CFG.lr / 10})  # a resume takes the lr given now
    train(tiny_llama(), batches(), lower, tmp_path)
    for record in step_records(tmp_path)[3:]:  # cosine over steps 3..5 of 0..5 after warmup
        progress = (record["step"] - 1 - CFG.warmup_steps) / (CFG.steps - CFG.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        factor = CFG.min_lr_ratio + (1 - CFG.min_lr_ratio) * cosine
        assert record["lr"] == pytest.approx(lower.lr * factor, rel=1e-12)


def test_finished_stage_returns_at_once_with_trained_weights(straight, tmp_path):
    weights, _, _ = straight
    train(tiny_llama(dropout=DROPOUT), batches(), CFG, tmp_path)
    model = tiny_llama(seed=99, dropout=DROPOUT)
    result = train(model, lambda i: pytest.fail("no batch may be drawn"), CFG, tmp_path)
    assert result.steps == CFG.steps
    assert_same_weights(trainable(model), weights)


def test_only_trainable_parameters_change(tmp_path):
    model = tiny_llama()
    frozen = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, batches(), TrainConfig(steps=2, lr=1e-2), tmp_path)
    params = dict(model.named_parameters())
    for name in frozen:
        assert torch.equal(params[name], before[name])
        assert params[name].grad is None
    changed = [n for n in params if n not in frozen and not torch.equal(params[n], before[n])]
    assert len(changed) == len(params) - len(frozen)
    ckpt = tmp_path / "checkpoint"
    assert set(safetensors.torch.load_file(ckpt / "model.safetensors")) == set(changed)
    state = safetensors.torch.load_file(ckpt / "optimizer.safetensors")
    assert {k.split(".")[0] for k in state} == {str(i) for i in range(len(changed))}
    assert "forward" not in vars(model)  # plain nn.Module again


def test_bf16_on_cpu_trains_and_leaves_a_plain_model(tmp_path):
    model = tiny_llama()
    before = trainable(model)
    result = train(model, batches(), TrainConfig(steps=2, mixed_precision="bf16"), tmp_path)
    assert math.isfinite(result.final_loss)
    assert "forward" not in vars(model)  # accelerate's autocast wrapper is gone
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(torch.equal(before[n], p) for n, p in trainable(model).items())


def test_crash_during_save_keeps_previous_checkpoint(straight, tmp_path, monkeypatch):
    weights, losses, _ = straight
    real_write = bt._write_json

    def crash_on_second_save(path, obj):
        if path.name == "trainer_state.json" and obj["progress"]["step"] == 4:
            raise RuntimeError("killed")
        real_write(path, obj)

    monkeypatch.setattr(bt, "_write_json", crash_on_second_save)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_llama(dropout=DROPOUT), batches(), CFG, tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.glob("checkpoint.tmp-*"))  # the half-written save is left behind
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 2
    # A kill between the two renames of a swap leaves only checkpoint.old.
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    model = tiny_llama(seed=99, dropout=DROPOUT)
    train(model, batches(), CFG, tmp_path)
    assert_same_weights(trainable(model), weights)
    assert [r["loss"] for r in step_records(tmp_path)] == losses
    assert not list(tmp_path.glob("checkpoint.tmp-*"))
    assert not (tmp_path / "checkpoint.old").exists()


@pytest.mark.parametrize(
    "victim", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"]
)
def test_corrupt_checkpoint_is_an_error(tmp_path, victim):
    train(tiny_llama(), batches(), CFG, tmp_path, stop_after=2)
    path = tmp_path / "checkpoint" / victim
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(BtsError, match=f"{path}.*delete"):
        train(tiny_llama(), batches(), CFG, tmp_path)


def test_checkpoint_of_another_model_is_an_error(tmp_path):
    train(tiny_llama(), batches(), CFG, tmp_path, stop_after=2)
    with pytest.raises(BtsError, match="does not match the model"):
        train(tiny_llama(hidden=48), batches(), CFG, tmp_path)


def test_batch_must_be_two_dimensional(tmp_path):
    with pytest.raises(BtsError, match="shape"):
        train(tiny_llama(), lambda i: torch.zeros(16, dtype=torch.long), CFG, tmp_path)


class Poisoned(torch.nn.Module):
    """Multiplies the loss by `factor` on micro-batches whose first token is POISON."""

    def __init__(self, inner: torch.nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, input_ids, labels):
        out = self.inner(input_ids=input_ids, labels=labels)
        if (input_ids[:, 0] == POISON).any():
            out.loss = out.loss * self.factor
        return out


def poisoned_batches(bad_steps):
    clean = batches(high=POISON)

    def batch_fn(i: int) -> torch.Tensor:
        batch = clean(i)
        if i in bad_steps:  # grad_accum is 1 below, so micro-batch i is step i
            batch[0, 0] = POISON
        return batch

    return batch_fn


GUARD_CFG = TrainConfig(steps=5, lr=1e-2, log_every=1, spike_warmup=2, max_consecutive_skips=3)


def test_nan_step_is_skipped_and_training_continues(tmp_path):
    train(
        Poisoned(tiny_llama(), 1.0), poisoned_batches(()), GUARD_CFG, tmp_path / "a", stop_after=2
    )
    clean = safetensors.torch.load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    bad = tmp_path / "b"
    model = Poisoned(tiny_llama(), math.nan)
    train(model, poisoned_batches({2}), GUARD_CFG, bad, stop_after=3)
    assert_same_weights(trainable(model), clean)  # step 3 changed nothing
    result = train(Poisoned(tiny_llama(), math.nan), poisoned_batches({2}), GUARD_CFG, bad)
    assert result.steps == 5 and result.skipped == 1 and math.isfinite(result.final_loss)
    [skip] = skip_records(bad)
    assert skip["step"] == 3 and skip["reason"].startswith("non-finite")
    optimizer = safetensors.torch.load_file(bad / "checkpoint" / "optimizer.safetensors")
    assert optimizer["0.step"].item() == 4  # four real updates in five steps


def test_loss_spike_is_skipped(tmp_path):
    result = train(Poisoned(tiny_llama(), 100.0), poisoned_batches({3}), GUARD_CFG, tmp_path)
    assert result.skipped == 1
    [skip] = skip_records(tmp_path)
    assert skip["step"] == 4 and skip["reason"] == "loss spike"


def test_small_losses_varying_by_large_ratios_are_not_spikes():
    guard = _Progress()
    for loss in [0.05] * 30:
        guard.record(loss, skipped=False)
    cfg = GUARD_CFG.model_copy(update={"spike_warmup": 20})
    assert guard.skip_code(0.27, 1.0, cfg) == 0  # 5x the mean, but 0.22 nats above it
    assert guard.skip_code(0.6, 1.0, cfg) != 0  # 12x and 0.55 nats above: a spike


def test_persistent_nan_raises_after_max_consecutive_skips(tmp_path):
    model = Poisoned(tiny_llama(), math.nan)
    with pytest.raises(BtsError, match="'guard' diverged: 3 consecutive skipped steps at step 3"):
        train(model, poisoned_batches(range(5)), GUARD_CFG, tmp_path, name="guard")
    assert len(skip_records(tmp_path)) == 3


def test_ddp_two_processes_match_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*cmd, str(worker), str(tmp_path)], env=env, check=True, timeout=300)
    ranks = [safetensors.torch.load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    micro = DDP_CFG.steps * DDP_CFG.grad_accum
    for r in (0, 1):  # rank r trained on rows r::2 of every global micro-batch, in order
        assert torch.equal(
            ranks[r].pop("seen"), torch.stack([batches()(i)[r::2] for i in range(micro)])
        )
        error = (tmp_path / f"rank{r}.txt").read_text()
        assert error.startswith("micro-batch 0 has 3 rows, not divisible by the world size 2")
    assert_same_weights(ranks[0], ranks[1])
    assert sorted((tmp_path / "run" / "checkpoint").glob("rng_*.json"))[-1].name == "rng_1.json"
    model = tiny_llama()
    single = train(model, batches(), DDP_CFG, tmp_path / "single")
    for name, tensor in trainable(model).items():
        torch.testing.assert_close(ranks[0][name], tensor, rtol=0, atol=1e-5)
    ddp = TrainResult(**json.loads((tmp_path / "run" / "train_result.json").read_text()))
    assert ddp.tokens == single.tokens
    assert ddp.final_loss == pytest.approx(single.final_loss, abs=1e-5)
