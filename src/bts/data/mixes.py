"""Data mixes: weights over domains, and a batch sampler that is a pure function of the step.

`MixSampler.batch(step)` depends only on (seed, step), never on earlier calls, so a run that
resumes at step k sees exactly the batches it would have seen without stopping.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from bts.data.packing import PackedSequences
from bts.errors import BtsError

MixKind = Literal["explicit", "proportional", "uniform", "unimax"]


def mix_weights(
    kind: MixKind,
    token_counts: dict[str, int],
    explicit: dict[str, float] | None = None,
    budget_tokens: int | None = None,
    max_epochs: float = 1.0,
) -> dict[str, float]:
    """Normalised sampling weights over the domains of `token_counts`.

    explicit: the given weights (missing domains get 0); proportional: by token count;
    uniform: equal; unimax: UniMax (Chung et al. 2023, arXiv 2304.09151): the budget is spread
    uniformly, each domain capped at `max_epochs` times its tokens, the surplus going to the rest.
    """
    if not token_counts:
        raise BtsError("no domains to mix: give at least one domain")
    if any(count < 0 for count in token_counts.values()):
        raise BtsError(f"negative token counts in {token_counts}: counts must be >= 0")
    if kind == "explicit":
        raw = _explicit(token_counts, explicit)
    elif kind == "proportional":
        raw = {name: float(count) for name, count in token_counts.items()}
    elif kind == "uniform":
        raw = {name: 1.0 for name in token_counts}
    elif kind == "unimax":
        raw = unimax_tokens(token_counts, budget_tokens, max_epochs)
    else:
        raise BtsError(f"unknown mix kind '{kind}': use explicit, proportional, uniform or unimax")
    total = sum(raw.values())
    if total <= 0:
        raise BtsError(f"mix '{kind}' gives every domain weight 0: give some a positive weight")
    return {name: value / total for name, value in raw.items()}


def _explicit(token_counts: dict[str, int], explicit: dict[str, float] | None) -> dict[str, float]:
    """Given weights checked against the known domains."""
    if explicit is None:
        raise BtsError("mix 'explicit' needs weights: pass explicit={domain: weight, ...}")
    unknown = sorted(set(explicit) - set(token_counts))
    if unknown:
        raise BtsError(f"mix weights name unknown domains {unknown}: use {sorted(token_counts)}")
    if any(w < 0 for w in explicit.values()):
        raise BtsError(f"mix weights {explicit} contain a negative weight: use weights >= 0")
    return {name: float(explicit.get(name, 0.0)) for name in token_counts}


def unimax_tokens(
    token_counts: dict[str, int], budget_tokens: int | None, max_epochs: float = 1.0
) -> dict[str, float]:
    """UniMax allocation in tokens; sums to less than the budget only when every domain is capped.

    Domains are visited from smallest to largest: each gets an equal share of what is left,
    but at most `max_epochs` epochs of its data.
    """
    if budget_tokens is None or budget_tokens <= 0:
        raise BtsError("mix 'unimax' needs budget_tokens > 0 (the tokens the run will train on)")
    if max_epochs <= 0:
        raise BtsError(f"max_epochs is {max_epochs}: it must be positive (e.g. 1.0)")
    order = sorted(token_counts, key=lambda name: (token_counts[name], name))
    remaining, allocation = float(budget_tokens), {}
    for i, name in enumerate(order):
        share = remaining / (len(order) - i)
        allocation[name] = min(share, max_epochs * token_counts[name])
        remaining -= allocation[name]
    return {name: allocation[name] for name in token_counts}


class MixSampler:
    """Batches of packed rows drawn by domain weight; `batch(step)` is a pure function."""

    def __init__(
        self,
        datasets: dict[str, PackedSequences],
        weights: dict[str, float],
        batch_size: int,
        seed: int,
    ) -> None:
        unknown = sorted(set(weights) - set(datasets))
        if unknown:
            raise BtsError(f"weights name domains without data {unknown}: use {sorted(datasets)}")
        self.names = sorted(name for name in datasets if weights.get(name, 0.0) > 0)
        if not self.names or any(w < 0 for w in weights.values()):
            raise BtsError(f"mix weights {weights} need a positive weight and no negative one")
        empty = [name for name in self.names if len(datasets[name]) == 0]
        if empty:
            raise BtsError(f"domains {empty} have no packed rows: add text or lower seq_len")
        seq_lens = {datasets[name].seq_len for name in self.names}
        if len(seq_lens) != 1:
            raise BtsError(f"domains are packed with different seq_len {sorted(seq_lens)}: repack")
        if batch_size < 1:
            raise BtsError(f"batch_size is {batch_size}: it must be at least 1")
        self.datasets = {name: datasets[name] for name in self.names}
        total = sum(weights[name] for name in self.names)
        self.probs = np.array([weights[name] / total for name in self.names])
        self.sizes = np.array([len(self.datasets[name]) for name in self.names])
        self.batch_size, self.seed, self.seq_len = batch_size, seed, seq_lens.pop()

    @classmethod
    def single(cls, name: str, data: PackedSequences, batch_size: int, seed: int) -> MixSampler:
        """A sampler over one domain (an expert's continued pre-training)."""
        return cls({name: data}, {name: 1.0}, batch_size, seed)

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain index, row index) per batch row; rows are drawn with replacement."""
        if step < 0:
            raise BtsError(f"step is {step}: steps start at 0")
        rng = np.random.default_rng([self.seed, step])
        domains = rng.choice(len(self.names), size=self.batch_size, p=self.probs)
        rows = rng.integers(0, self.sizes[domains])
        return domains, rows

    def batch(self, step: int) -> torch.LongTensor:
        """The batch for `step`, shape [batch_size, seq_len], the same on every call."""
        domains, rows = self._draw(step)
        picked = [self.datasets[self.names[d]][r] for d, r in zip(domains, rows, strict=True)]
        return torch.from_numpy(np.stack(picked).astype(np.int64))

    def domains_of(self, step: int) -> list[str]:
        """Which domain each row of `batch(step)` came from."""
        domains, _ = self._draw(step)
        return [self.names[d] for d in domains]
