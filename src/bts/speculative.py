"""Speculative (assisted) greedy decoding for the stitched model.

A cheap drafter proposes k tokens one by one; the stitched model scores all of them in one forward
(k+1 positions) and keeps the longest prefix that its own greedy choice agrees with, plus its own
next token. Every kept token is the stitched model's greedy token given the tokens before it, so
the output is plain greedy decoding's, token for token (up to float summation order, which a
near-tie between two logits could expose; the tests and the benchmark check identity).

In a padded batch all rows keep the same number of drafts: the smallest agreement over the rows
still running (a row that agreed further simply re-derives those tokens next round). Both caches
are cropped back to what was kept.

We do not use transformers' assisted generation: it drives `model.forward` through its own
generation mixin and cache classes, which the stitched model (one cache per constituent, or a
stacked one) does not implement. This loop is small and exact.

This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from bts.batched import StackedCache, attention_mask_4d, run_block
from bts.errors import BtsError
from bts.heads import crop_output_state
from bts.models import decoder
from bts.stitch import HUB, StitchedModel, _position_ids, append_token


class HubDrafter:
    """The stitched model's own hub as drafter, on the stacked weights (views, no copy)."""

    def __init__(self, model: StitchedModel):
        self.model = model
        self.stacks = model._stacks()
        self.layers = [layer.first(1) for layer in self.stacks.layers]
        self.cache = StackedCache()

    def seen(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hub = self.model.hub
        past = self.seen()
        positions = _position_ids(ids, mask, past)
        x = hub.model.embed_tokens(ids)[None]
        rotary = hub.model.rotary_emb(x[0], positions)
        mask4 = attention_mask_4d(mask, ids.shape[0], ids.shape[1], past, ids.device)
        for index, layer in enumerate(self.layers):
            x = run_block(self.stacks, layer, index, x, rotary, mask4, self.cache)
        return decoder(hub, "hub").logits(x[0, :, -1])


class ModelDrafter:
    """Any causal LM with the stitched model's vocabulary (the hub when nothing is stacked)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = DynamicCache(config=model.config)

    def seen(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        if length < self.seen():
            self.cache.crop(length - self.seen())

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = _position_ids(ids, mask, self.seen())
        out = self.model(
            ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]


def make_drafter(model: StitchedModel, assistant: str | nn.Module):
    if isinstance(assistant, str):
        if assistant != HUB:
            raise BtsError(f"assistant_model='{assistant}' is unknown: use 'hub', a model or None")
        return HubDrafter(model) if model._stacks() is not None else ModelDrafter(model.hub)
    vocab = getattr(getattr(assistant, "config", None), "vocab_size", None)
    if vocab != model.config.vocab_size:
        raise BtsError(
            f"the assistant model's vocabulary ({vocab}) differs from the stitched model's "
            f"({model.config.vocab_size}): drafts must use the same tokenizer"
        )
    return ModelDrafter(assistant)


def draft(drafter, tokens: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`count` greedy tokens from the drafter after `tokens` (it first reads what it missed)."""
    drafts = []
    fresh = tokens[:, drafter.seen() :]
    for _ in range(count):
        logits = drafter.next_logits(fresh, mask)
        fresh = logits.argmax(dim=-1, keepdim=True)
        drafts.append(fresh)
        mask = torch.cat([mask, torch.ones_like(fresh)], dim=1)
    return torch.cat(drafts, dim=1)


@dataclass
class SpeculativeStats:
    """What one speculative generate call did; acceptance = accepted / drafted."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def speculative_generate(
    model: StitchedModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    drafter,
    num_draft: int,
    eos_token_id: int | None,
    pad_token_id: int,
    prune_threshold: float | None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of `model`, drafts from `drafter` verified `num_draft` at a time."""
    stats = SpeculativeStats()
    tokens, cache = input_ids, model.new_cache()
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if max_new_tokens <= 0:
        return tokens, stats
    # the prompt alone first, exactly as plain decoding does (pruning is decided on it)
    out = model(
        tokens,
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        return_gates=prune_threshold is not None,
    )
    keep = (
        model.expert_keep_from_gates(out.gates, mask, prune_threshold)
        if prune_threshold is not None
        else None
    )
    tokens, mask, finished = append_token(
        tokens, mask, finished, out.logits[:, -1].argmax(-1), eos_token_id, pad_token_id
    )
    produced = 1
    while produced < max_new_tokens and not finished.all():
        count = min(num_draft, max_new_tokens - produced - 1)
        seen = tokens.shape[1] - 1  # the stitched cache holds all but the last token
        drafts = draft(drafter, tokens, mask, count) if count else tokens[:, :0]
        fed = torch.cat([tokens[:, -1:], drafts], dim=1)
        out = model(
            fed,
            attention_mask=torch.cat([mask, torch.ones_like(drafts)], dim=1),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=count + 1,
            expert_keep=keep,
        )
        targets = out.logits.argmax(dim=-1)  # the stitched model's choice after each prefix
        agreed = (drafts == targets[:, :count]).long().cumprod(dim=1).sum(dim=1)
        kept = int(agreed[~finished].min()) if count else 0
        stats.drafted, stats.accepted = stats.drafted + count, stats.accepted + kept
        stats.verify_steps += 1
        _crop(cache, seen + 1 + kept)  # the rejected drafts leave the cache
        if count:
            drafter.crop(seen + 1 + min(kept, count - 1))
        new = torch.cat([drafts[:, :kept], targets[:, kept : kept + 1]], dim=1)
        for column in new.unbind(dim=1):
            tokens, mask, finished = append_token(
                tokens, mask, finished, column, eos_token_id, pad_token_id
            )
            produced += 1
            if finished.all() or produced >= max_new_tokens:
                break
    return tokens, stats


def _crop(caches: StackedCache | dict[str, DynamicCache], length: int) -> None:
    crop_output_state(caches, length)
    if isinstance(caches, StackedCache):
        caches.crop(length)
        return
    for cache in caches.values():
        if length < cache.get_seq_length():
            cache.crop(length - cache.get_seq_length())
