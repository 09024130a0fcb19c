"""Mix weights (exact where the arithmetic is exact) and the step-pure sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bts.data.mixes import MixSampler, mix_weights, unimax_tokens
from bts.data.packing import PackedSequences
from bts.errors import BtsError

COUNTS = {"a": 100, "b": 1000, "c": 10000}


def test_uniform_proportional_explicit() -> None:
    assert mix_weights("uniform", COUNTS) == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert mix_weights("proportional", COUNTS) == {
        "a": 100 / 11100,
        "b": 1000 / 11100,
        "c": 10000 / 11100,
    }
    assert mix_weights("explicit", COUNTS, explicit={"a": 3, "c": 1}) == {
        "a": 0.75,
        "b": 0.0,
        "c": 0.25,
    }


def test_unimax_caps_small_domains_and_redistributes() -> None:
    # budget 3000: a takes its 100 tokens (cap), b its 1000 (cap of 1 epoch), c the 1900 left
    assert unimax_tokens(COUNTS, 3000, max_epochs=1.0) == {"a": 100, "b": 1000, "c": 1900}
    assert mix_weights("unimax", COUNTS, budget_tokens=3000) == {
        "a": 100 / 3000,
        "b": 1000 / 3000,
        "c": 1900 / 3000,
    }
    # 4 epochs: a takes 400, then b and c split the remaining 2600 equally
    assert unimax_tokens(COUNTS, 3000, max_epochs=4.0) == {"a": 400, "b": 1300, "c": 1300}
    # a budget nobody's cap binds is uniform
    assert mix_weights("unimax", COUNTS, budget_tokens=150) == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    # a budget above every cap is proportional to the caps
    assert unimax_tokens(COUNTS, 10**9, max_epochs=2.0) == {"a": 200, "b": 2000, "c": 20000}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "unimax"}, "budget_tokens"),
        ({"kind": "explicit"}, "needs weights"),
        ({"kind": "explicit", "explicit": {"z": 1.0}}, "unknown domains"),
        ({"kind": "explicit", "explicit": {"a": 0.0}}, "weight 0"),
        ({"kind": "explicit", "explicit": {"a": -1.0, "b": 2.0}}, "negative"),
        ({"kind": "bogus"}, "unknown mix kind"),
    ],
)
def test_bad_mixes_are_bts_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(BtsError, match=message):
        mix_weights(token_counts=COUNTS, **kwargs)


def packed(tmp_path: Path, name: str, rows: int, offset: int, seq_len: int = 4) -> PackedSequences:
    """Rows whose tokens encode (domain offset + row index), so a row reveals its origin."""
    array = np.repeat(np.arange(rows, dtype=np.uint16)[:, None] + offset, seq_len, axis=1)
    np.save(tmp_path / f"{name}.npy", array)
    return PackedSequences(tmp_path / f"{name}.npy")


@pytest.fixture
def datasets(tmp_path: Path) -> dict[str, PackedSequences]:
    return {
        "a": packed(tmp_path, "a", 50, 0),
        "b": packed(tmp_path, "b", 7, 1000),
        "c": packed(tmp_path, "c", 300, 2000),
    }


def test_proportions_match_weights(datasets) -> None:
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    sampler = MixSampler(datasets, weights, batch_size=32, seed=0)
    names = [n for step in range(300) for n in sampler.domains_of(step)]
    for name, weight in weights.items():
        assert abs(names.count(name) / len(names) - weight) < 0.03  # ~6 standard deviations


def test_rows_come_from_the_reported_domain(datasets) -> None:
    sampler = MixSampler(datasets, {"a": 1, "b": 1, "c": 1}, batch_size=16, seed=3)
    offsets = {"a": 0, "b": 1000, "c": 2000}
    for step in range(20):
        batch = sampler.batch(step)
        assert batch.dtype == torch.int64 and batch.shape == (16, 4)
        for row, name in zip(batch, sampler.domains_of(step), strict=True):
            index = int(row[0]) - offsets[name]
            assert 0 <= index < len(datasets[name])
            assert row.tolist() == datasets[name][index].tolist()


def test_batch_is_a_pure_function_of_seed_and_step(datasets) -> None:
    weights = {"a": 0.2, "b": 0.3, "c": 0.5}
    forward = MixSampler(datasets, weights, 8, seed=11)
    expected = [forward.batch(step) for step in range(10)]
    resumed = MixSampler(datasets, weights, 8, seed=11)
    for step in reversed(range(10)):
        assert torch.equal(resumed.batch(step), expected[step])
    assert not torch.equal(MixSampler(datasets, weights, 8, seed=12).batch(0), expected[0])


def test_zero_weight_domain_is_never_drawn(datasets) -> None:
    sampler = MixSampler(datasets, {"a": 1.0, "b": 0.0}, 16, seed=0)
    assert {n for step in range(50) for n in sampler.domains_of(step)} == {"a"}


def test_single_domain(datasets) -> None:
    sampler = MixSampler.single("c", datasets["c"], 4, seed=0)
    assert sampler.domains_of(5) == ["c"] * 4
    assert all(2000 <= int(t) < 2300 for t in sampler.batch(5).flatten())


def test_sampler_rejects_bad_inputs(datasets, tmp_path: Path) -> None:
    with pytest.raises(BtsError, match="without data"):
        MixSampler(datasets, {"z": 1.0}, 4, 0)
    with pytest.raises(BtsError, match="different seq_len"):
        MixSampler(
            {**datasets, "d": packed(tmp_path, "d", 5, 0, seq_len=8)}, {"a": 1, "d": 1}, 4, 0
        )
    with pytest.raises(BtsError, match="positive weight"):
        MixSampler(datasets, {"a": 0.0}, 4, 0)
