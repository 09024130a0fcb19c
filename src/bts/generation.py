"""Decoding, as functions over a model: plain (greedy or sampled), speculative, and pruning.

`StitchedModel.generate` calls `generate` here; BTM and expert routing share its token helpers
(`special_tokens`, `append_token`) so that EOS and padding mean the same for every system. How a
stitched model runs is data, `InferenceOptions`, held by the model and set from the run's
`inference` config (docs/inference.md has the measurements behind each default).

Speculative (assisted) greedy decoding: a cheap drafter proposes k tokens one by one; the stitched
model scores all of them in one forward (k+1 positions) and keeps the longest prefix that its own
greedy choice agrees with, plus its own next token. Every kept token is the stitched model's
greedy token given the tokens before it, so the output is plain greedy decoding's, token for token
(up to float summation order, which a near-tie between two logits could expose; the tests and the
benchmark check identity). In a padded batch all rows keep the same number of drafts: the
smallest agreement over the rows still running. Both caches are cropped back to what was kept.

We do not use transformers' assisted generation: it drives `model.forward` through its own
generation mixin and cache classes, which the stitched model (one cache per constituent, or a
stacked one) does not implement. This loop is small and exact.

This module does no I/O and imports no stitching code: it takes the model it decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from bts.arch import adapter, layer_types
from bts.batched import StackedCache, attention_mask_4d, run_block
from bts.errors import BtsError
from bts.heads import crop_output_state
from bts.models import HUB, position_ids

_UNSET = object()  # "argument not given" where None is a meaningful value


@dataclass
class InferenceOptions:
    """How a stitched model runs; outputs are the same either way except with pruning.

    - batched: constituents as one batch over stacked weights in eval mode (the per-model loop
      otherwise); batched_training: the same in train mode, where a 16 x 128 stitch-stage step
      measured 1.10x the loop's time (no in-place stream updates), so training loops by default;
    - assistant: greedy decoding drafts with this ("hub": the stitched model's own hub, no weight
      copy; a causal LM with the same vocabulary; None: plain decoding), `num_assistant_tokens`
      at a time, up to batch `assistant_max_batch` (a batch keeps the smallest agreement over
      its rows, and at batch 8 that made speculative decoding slower than plain, measured);
    - prune_threshold: skip an expert for a whole sequence when its experts-into-hub gate mass on
      the prompt is below this (None: never); it changes outputs, so it is off by default;
    - checkpoint_frozen: in train mode on the loop, frozen blocks recompute their activations
      in the backward pass (torch.utils.checkpoint) instead of keeping them.
    """

    batched: bool = True
    batched_training: bool = False
    assistant: str | nn.Module | None = HUB
    num_assistant_tokens: int = 4
    assistant_max_batch: int = 1
    prune_threshold: float | None = None
    # stitch training recomputes the frozen blocks' activations in the backward pass instead
    # of keeping them (`stitch.checkpoint_frozen`): less memory, same loss and gradients
    checkpoint_frozen: bool = False

    def __post_init__(self):
        if self.num_assistant_tokens < 1:
            raise BtsError(f"num_assistant_tokens={self.num_assistant_tokens} must be at least 1")


@dataclass
class SpeculativeStats:
    """What one speculative generate call did; acceptance = accepted / drafted."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


# --- tokens ----------------------------------------------------------------------------------


def special_tokens(config, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    """(the end-of-sequence ids, the padding id): the config's EOS when none is given (one id
    or several, as transformers allows), padding with the first EOS (or 0)."""
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [int(t) for t in (eos if isinstance(eos, list | tuple) else [eos])]
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    return eos, pad


def append_token(tokens, mask, finished, next_token, eos: list[int], pad: int):
    """Append one token per row; rows that produced EOS before get padding from then on."""
    if eos:
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        finished = finished | torch.isin(next_token, torch.tensor(eos, device=next_token.device))
    tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=1)
    return tokens, mask, finished


def choose(logits, do_sample: bool, temperature: float, top_k: int | None, generator):
    """The next token per row: argmax, or a sample at `temperature` among the `top_k` best."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


# --- pruning ---------------------------------------------------------------------------------


def expert_keep_from_gates(model, gates, attention_mask, threshold: float) -> torch.Tensor:
    """Per row, keep an expert whose experts-into-hub gate mass (mean over the stitches and the
    real tokens of the forward that returned `gates`) is at least `threshold`."""
    records = [g for g in gates if g.kind == "experts_into_hub"]
    weights = torch.stack([g.weights for g in records]).mean(0)  # [batch, seq, sources]
    length = weights.shape[1]
    real = (
        torch.ones(weights.shape[:2], device=weights.device)
        if attention_mask is None
        else attention_mask[:, -length:].to(weights.dtype)
    )
    mass = (weights * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
    sources = records[0].sources
    return torch.stack(
        [
            mass[:, sources.index(n)] >= threshold
            if n in sources
            else torch.zeros_like(mass[:, 0], dtype=torch.bool)
            for n in model.expert_names
        ],
        dim=1,
    )


# --- generate --------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    assistant_model: str | nn.Module | None | object = _UNSET,
    num_assistant_tokens: int | None = None,
    prune_threshold: float | None | object = _UNSET,
    stats: SpeculativeStats | None = None,
) -> torch.Tensor:
    """Greedy or sampled decoding of a stitched model with KV caches; prompt + new tokens.

    Prompts in a batch are left-padded (attention_mask 0 on the left), as in transformers.
    `assistant_model` ("hub", a causal LM with the same vocabulary, or None) drafts
    `num_assistant_tokens` tokens that one stitched forward verifies: greedy output is
    token-for-token that of plain decoding. Left out, these come from `model.inference`.
    `stats`, if given, counts what speculative decoding did.
    """
    options = model.inference
    eos, pad = special_tokens(model.config, eos_token_id, pad_token_id)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    threshold = options.prune_threshold if prune_threshold is _UNSET else prune_threshold
    assistant = _assistant(model, assistant_model, do_sample, use_cache, input_ids.shape[0])
    if assistant is None:
        sampling = (do_sample, temperature, top_k, generator)
        return _plain(model, input_ids, mask, max_new_tokens, sampling, eos, pad, use_cache,
                      threshold)
    count = num_assistant_tokens or options.num_assistant_tokens
    drafter = make_drafter(model, assistant)
    return speculative(model, input_ids, mask, max_new_tokens, drafter, count, eos, pad,
                       threshold, stats if stats is not None else SpeculativeStats())


def _assistant(model, assistant_model, do_sample: bool, use_cache: bool, rows: int):
    """The drafter to use, or None; an explicit assistant with sampling is refused."""
    sliding = any(
        "sliding_attention" in layer_types(m.config) for m in [model.hub, *model.experts.values()]
    )  # a sliding-window cache cannot be rolled back past its window
    if assistant_model is _UNSET:  # the default quietly steps aside where it cannot apply
        options = model.inference
        usable = not do_sample and use_cache and not sliding and rows <= options.assistant_max_batch
        return options.assistant if usable else None
    if assistant_model is not None and (do_sample or not use_cache):
        raise BtsError(
            "speculative decoding here is greedy and cached: pass assistant_model=None to "
            "sample or to decode without a cache"
        )
    if assistant_model is not None and sliding:
        raise BtsError(
            "speculative decoding needs caches that can roll back, and a constituent uses "
            "sliding-window attention: pass assistant_model=None"
        )
    return assistant_model


def _plain(model, input_ids, mask, max_new_tokens, sampling, eos, pad, use_cache, threshold):
    """One stitched forward per new token (with pruning decided on the prompt, if asked)."""
    tokens, caches = input_ids, (model.new_cache() if use_cache else None)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    keep = None
    for step in range(max_new_tokens):
        fresh = tokens if (step == 0 or not use_cache) else tokens[:, -1:]
        prune_now = step == 0 and threshold is not None
        out = model(
            fresh,
            attention_mask=mask,
            past_key_values=caches,
            use_cache=use_cache,
            logits_to_keep=1,
            return_gates=prune_now,
            expert_keep=keep,
        )
        if prune_now:
            keep = expert_keep_from_gates(model, out.gates, mask, threshold)
        next_token = choose(out.logits[:, -1].float(), *sampling)
        tokens, mask, finished = append_token(tokens, mask, finished, next_token, eos, pad)
        if finished.all():
            break
    return tokens


# --- speculative -----------------------------------------------------------------------------


class HubDrafter:
    """The stitched model's own hub as drafter, on the stacked weights (views, no copy)."""

    def __init__(self, model, stacks):
        self.hub = model.hub
        self.stacks = stacks
        self.layers = [layer.first(1) for layer in stacks.layers]
        self.cache = StackedCache()

    def seen(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    def next_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        past = self.seen()
        positions = position_ids(ids, mask, past)
        dec = adapter(self.hub, HUB)
        x = dec.embed(ids)[None]
        rotary = dec.rotary(x[0], positions)
        mask4 = attention_mask_4d(mask, ids.shape[0], ids.shape[1], past, ids.device)
        for index, layer in enumerate(self.layers):
            x = run_block(self.stacks, layer, index, x, rotary, mask4, self.cache)
        return dec.logits(x[0, :, -1])


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
        out = self.model(
            ids,
            attention_mask=mask,
            position_ids=position_ids(ids, mask, self.seen()),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]


def make_drafter(model, assistant: str | nn.Module):
    if isinstance(assistant, str):
        if assistant != HUB:
            raise BtsError(f"assistant_model='{assistant}' is unknown: use 'hub', a model or None")
        stacks = model.executor.stacks(model)
        return HubDrafter(model, stacks) if stacks is not None else ModelDrafter(model.hub)
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


def speculative(
    model, input_ids, mask, max_new_tokens, drafter, num_draft, eos, pad, threshold, stats
) -> torch.Tensor:
    """Greedy decoding of `model`, drafts from `drafter` verified `num_draft` at a time."""
    tokens, cache = input_ids, model.new_cache()
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    if max_new_tokens <= 0:
        return tokens
    # the prompt alone first, exactly as plain decoding does (pruning is decided on it)
    out = model(tokens, attention_mask=mask, past_key_values=cache, use_cache=True,
                logits_to_keep=1, return_gates=threshold is not None)
    keep = None if threshold is None else expert_keep_from_gates(model, out.gates, mask, threshold)
    tokens, mask, finished = append_token(
        tokens, mask, finished, out.logits[:, -1].argmax(-1), eos, pad
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
        crop_cache(cache, seen + 1 + kept)  # the rejected drafts leave the cache
        if count:
            drafter.crop(seen + 1 + min(kept, count - 1))
        new = torch.cat([drafts[:, :kept], targets[:, kept : kept + 1]], dim=1)
        for column in new.unbind(dim=1):
            tokens, mask, finished = append_token(tokens, mask, finished, column, eos, pad)
            produced += 1
            if finished.all() or produced >= max_new_tokens:
                break
    return tokens


def crop_cache(caches: StackedCache | dict[str, DynamicCache], length: int) -> None:
    """Cut a stitched model's cache (stacked, or one per constituent) back to `length` tokens."""
    crop_output_state(caches, length)
    if isinstance(caches, StackedCache):
        caches.crop(length)
        return
    for cache in caches.values():
        if length < cache.get_seq_length():
            cache.crop(length - cache.get_seq_length())
