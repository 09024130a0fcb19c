"""The output stitch (`stitch.output: mixture`): the experts' own heads, mixed per token.

Beyond the paper (docs/stitching.md, "The output stitch"). BTS takes its logits from the hub's
final norm and LM head; an expert's knowledge also lives in its own norm and head. With the
output stitch each constituent m (the hub, then the experts) applies its own head to its stream
after the last stitch layer, and the next-token distribution is a per-token gated mixture:

    prob:  p(x) = sum_m w_m p_m(x)          log:  p(x) ∝ exp(sum_m w_m log p_m(x))
    w = softmax with priors (1, a_1..a_n) of  l_m = W_m rms(h_0) + b_m + sum_k c_k E_m^k
    E_m^k(t) = sum_{s<=t} lambda_k^(t-s) log p_m(x_s | x_<s),   lambda = (1, 0.95)

E^k is each constituent's running log-likelihood of the context so far (lambda = 1: BTM's
evidence; a shorter memory lets the gate follow a change of domain). It is causal and cheap, since
every head runs anyway, and it is an input only (no gradient flows through it). With W = 0, b = 0,
c = (1, 0) and a = 1 the weights are BTM's posterior exactly. The gate starts at c = (0, 1), BTM
with forgetting, and a = 0, so at initialisation the output is exactly the hub's head (the same
a-trick as the stitch layers: a new expert enters with a = 0, a removed one leaves and the
weights renormalise); `uniform_initialisation` opens it (a = 1).

With a KV cache the running evidence and the last position's log-probabilities travel with the
cache (`OutputState`), so cached decoding scores each new token exactly as a full forward does,
and cropping the cache (speculative decoding) crops them too.

This module does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bts.arch import adapter
from bts.errors import BtsError
from bts.models import HUB, causal_lm_loss
from bts.spec import OutputMix

# memories of the evidence features: 1 is BTM's whole-context evidence, 0.95 a half-life of about
# 14 tokens, which follows a change of domain (chosen on validation rows, docs/stitching.md)
DECAYS = (1.0, 0.95)
# the evidence coefficients c_k at the start: BTM's posterior with that forgetting memory
EVIDENCE_INIT = (0.0, 1.0)
_STATE = "_bts_output_state"  # attribute of the cache object that carries an OutputState


class OutputStitch(nn.Module):
    """Gate over the hub's and each expert's own next-token distribution (see the module doc)."""

    def __init__(
        self, width: int, experts: Sequence[str], mix: OutputMix = "prob", evidence: bool = True
    ):
        super().__init__()
        if mix not in ("prob", "log"):
            raise BtsError(f"output mix '{mix}' is unknown: use 'prob' or 'log'")
        self.width, self.mix, self.evidence = width, mix, evidence
        self.gate = nn.ModuleDict({HUB: _zero_gate(width)})
        self.scale = nn.ParameterDict()
        # the evidence coefficients c_k: (1, 0) would be BTM's posterior exactly
        initial = torch.tensor(EVIDENCE_INIT)
        self.evidence_weight = nn.Parameter(initial) if evidence else None
        for name in experts:
            self.add_expert(name)

    @property
    def experts(self) -> list[str]:
        return list(self.scale.keys())

    def add_expert(self, name: str) -> None:
        """A zero gate row and prior a = 0: the expert's weight is exactly 0 until it trains."""
        self.gate[name] = _zero_gate(self.width)
        self.scale[name] = nn.Parameter(torch.zeros(()))

    def remove_expert(self, name: str) -> None:
        del self.gate[name]
        del self.scale[name]

    def expert_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.gate[name].parameters()
        yield self.scale[name]

    def weights(
        self,
        hub: torch.Tensor,
        evidence: torch.Tensor | None,
        names: Sequence[str],
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mixture weights [batch, seq, 1 + len(names)] (the hub first).

        `evidence` [decays, sources, batch, seq]; `keep` [batch, len(names)] closes an expert
        for some rows, as a prior of 0.
        """
        sources = [HUB, *names]
        weight = torch.cat([self.gate[s].weight for s in sources])
        bias = torch.cat([self.gate[s].bias for s in sources])
        logits = F.linear(F.rms_norm(hub.float(), (self.width,)), weight.float(), bias.float())
        if evidence is not None and self.evidence_weight is not None:
            logits = logits + torch.einsum("k,ksbt->bts", self.evidence_weight, evidence)
        priors = torch.stack([logits.new_ones(())] + [nonnegative(self.scale[n]) for n in names])
        priors = priors.expand(*logits.shape[:2], -1)
        if keep is not None:
            rows = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1).to(priors.dtype)
            priors = priors * rows[:, None, :]
        # shift by the largest logit among sources that can have weight, so the hub's term is
        # finite and a prior-0 source with a huge logit cannot overflow into inf * 0
        usable = torch.where(priors > 0, logits, torch.full_like(logits, float("-inf")))
        shift = usable.amax(dim=-1, keepdim=True).detach()
        unnormalised = priors * torch.exp((logits - shift).clamp(max=60.0))
        return unnormalised / unnormalised.sum(dim=-1, keepdim=True)

    def forward(self, log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Mixed next-token logits [batch, seq, vocab] from the sources' log-probs [sources,
        batch, seq, vocab] (hub first) and weights [batch, seq, sources]: log-probabilities for
        "prob", unnormalised for "log". Both return the hub's log-probabilities bit for bit when
        the hub's weight is 1."""
        w = weights.permute(2, 0, 1)[..., None]  # [sources, batch, seq, 1]
        ratio = log_probs - log_probs[:1]
        if self.mix == "log":  # sum_m w_m log p_m as log p_0 + sum_m w_m (log p_m - log p_0)
            return log_probs[0] + (w * ratio).sum(0)  # logits: cross-entropy normalises
        # log p_0 + log sum_m w_m exp(log p_m - log p_0), shifted by the largest ratio among the
        # sources with weight: at w = (1, 0, ..) the shift and the sum are exactly 0 and 1
        if bool((w > 0).all()):  # the usual case once trained: no vocabulary-sized mask
            shift = ratio.amax(0).detach()
        else:
            shift = torch.where(w > 0, ratio, torch.full_like(ratio, float("-inf")))
            shift = shift.amax(0).detach()
        mixed = (w * torch.exp(ratio - shift)).sum(0)
        return log_probs[0] + shift + mixed.log()


def mixed_output(
    stitch: OutputStitch, models, streams, names, keep, input_ids, attention_mask, cache,
    logits_to_keep: int, labels, loss_only: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The output stitch over a forward's final streams: each constituent's own head (`models`
    by name, the hub first) on its stream, mixed per token. Returns (logits, weights, loss).
    With evidence every position's head runs, since the gate scores the whole context.

    `loss_only` (training with the probability mix) never builds the mixture over the
    vocabulary: the loss needs only each head's probability of the targets, so logits is None
    there (the [sources, batch, seq, vocab] tensors cost 3x the step time)."""
    sources = [HUB, *names]
    last = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
    if not stitch.evidence:
        streams = {n: h[:, last] for n, h in streams.items()}
    heads = [adapter(models[n], n).logits(streams[n]).float() for n in sources]
    if loss_only and stitch.mix == "prob" and cache is None and not logits_to_keep:
        weights, loss = _mixture_loss(
            stitch, heads, streams[HUB], input_ids, attention_mask, labels, names, keep
        )
        return None, weights, loss
    log_probs = torch.stack([h.log_softmax(-1) for h in heads])
    del heads
    evidence = None
    if stitch.evidence:
        index = input_ids[None, :, 1:, None].expand(len(sources), -1, -1, 1)
        scored = log_probs[:, :, :-1].gather(-1, index)[..., 0]
        evidence = _cached_evidence(scored, log_probs, input_ids, attention_mask, cache, sources)
        log_probs, evidence = log_probs[:, :, last], evidence[..., last]
    weights = stitch.weights(streams[HUB][:, last], evidence, names, keep)
    logits = stitch(log_probs, weights)
    loss = causal_lm_loss(logits, labels) if labels is not None else None
    return logits, weights, loss


def _mixture_loss(stitch, heads, hub, input_ids, attention_mask, labels, names, keep):
    """(weights, loss) from each head's log-probability of the targets only."""
    normaliser = torch.stack([h.logsumexp(-1) for h in heads])[:, :, :-1]

    def scores(tokens):  # log p_m(tokens[t + 1]) at every position t but the last
        index = tokens[:, 1:, None]
        return torch.stack([h[:, :-1].gather(-1, index)[..., 0] for h in heads]) - normaliser

    evidence = None
    if stitch.evidence:
        evidence = running_evidence(scores(input_ids), input_ids, attention_mask, None)
    weights = stitch.weights(hub, evidence, names, keep)
    targets = labels[:, 1:]
    picked = scores(labels.clamp(min=0))[..., None]  # -100 (ignored) gathers any token
    token = stitch(picked, weights[:, :-1])[..., 0]
    valid = targets != -100
    return weights, -(token * valid).sum() / valid.sum().clamp(min=1)


def _cached_evidence(scored, log_probs, input_ids, attention_mask, cache, sources):
    """The new positions' running evidence [decays, sources, batch, new], continued from the
    cache's state, which then holds it and this forward's log-probs."""
    state = output_state(cache) if cache is not None else None
    if state is not None:
        state = state.select(sources)
    evidence = running_evidence(scored, input_ids, attention_mask, state)
    if cache is not None:
        seen = evidence if state is None else torch.cat([state.evidence, evidence], -1)
        set_output_state(cache, OutputState(seen, log_probs.detach(), sources))
    return evidence


def _zero_gate(width: int) -> nn.Linear:
    layer = nn.Linear(width, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def nonnegative(raw: torch.Tensor, upper: float | None = None) -> torch.Tensor:
    """Clamp to [0, upper] in the forward pass, identity gradient (projected gradient descent).

    A plain clamp would zero the gradient below 0 and leave a scale that stepped negative dead.
    """
    return raw + (raw.clamp(0.0, upper) - raw).detach()


# --- the running evidence ---------------------------------------------------------------------


@dataclass
class OutputState:
    """What cached decoding needs to continue the evidence: E at every position seen
    [decays, sources, batch, seen], and the log-probs of the last forward's positions
    [sources, batch, n, vocab], which cover positions seen - n .. seen - 1, for `sources`."""

    evidence: torch.Tensor
    log_probs: torch.Tensor
    sources: list[str]

    def select(self, sources: Sequence[str]) -> OutputState:
        """The state of some of its sources (experts pruned after the prompt drop out)."""
        if list(sources) == self.sources:
            return self
        if not set(sources) <= set(self.sources):
            raise BtsError(
                "the cache holds fewer experts than this forward runs: an expert pruned earlier "
                "in a sequence cannot come back; start again with model.new_cache()"
            )
        index = [self.sources.index(s) for s in sources]
        return OutputState(self.evidence[:, index], self.log_probs[index], list(sources))

    @property
    def seen(self) -> int:
        return self.evidence.shape[-1]

    def crop(self, length: int) -> None:
        """Forget positions from `length` on (the rejected drafts of speculative decoding)."""
        if length >= self.seen:
            return
        first = self.seen - self.log_probs.shape[2]
        if length - 1 < first:
            raise BtsError(
                f"cannot crop the output stitch's state to {length} tokens: it keeps only the "
                "last forward's positions; start again with model.new_cache()"
            )
        self.evidence = self.evidence[..., :length]
        self.log_probs = self.log_probs[:, :, : length - first]


def running_evidence(
    scored: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    state: OutputState | None,
) -> torch.Tensor:
    """E^k for the new positions [decays, sources, batch, new].

    `scored` [sources, batch, new - 1] is log p_m(x_j | x_<j) for the new positions j but the
    first, read from this forward's own positions; the first new token is scored from `state`
    (the positions before it; None: the sequence starts here and its first token scores 0).
    Padded tokens, and tokens whose context is padding, score 0."""
    new = input_ids.shape[1]
    seen = 0 if state is None else state.seen
    mask = (
        torch.ones(input_ids.shape[0], seen + new, dtype=torch.bool, device=input_ids.device)
        if attention_mask is None
        else attention_mask[:, -(seen + new) :].bool()
    )
    if seen:  # from the distribution the last forward predicted at its last position
        index = input_ids[None, :, :1, None].expand(state.log_probs.shape[0], -1, -1, 1)
        first = state.log_probs[:, :, -1:].gather(-1, index).squeeze(-1)
    else:
        first = scored.new_zeros(*scored.shape[:2], 1)
    scored = torch.cat([first, scored], dim=2)
    before = F.pad(mask, (1, 0), value=False)[:, :-1]  # is position p - 1 a real token?
    real = (mask & before)[:, -new:]
    scored = torch.where(real[None], scored, torch.zeros_like(scored)).detach()
    starts = [None] * len(DECAYS) if state is None else state.evidence[..., -1]
    return torch.stack(
        [_decayed_sum(scored, decay, starts[k]) for k, decay in enumerate(DECAYS)]
    )


def _decayed_sum(
    scores: torch.Tensor, decay: float, start: torch.Tensor | None
) -> torch.Tensor:
    """E(t) = decay * E(t - 1) + score(t) along the last axis, from E(-1) = start (or 0)."""
    length = scores.shape[-1]
    if decay == 1.0:
        total = scores.cumsum(-1)
        return total if start is None else total + start[..., None]
    steps = torch.arange(length, device=scores.device, dtype=scores.dtype)
    lags = steps[:, None] - steps[None, :]  # [t, s]
    kernel = torch.where(lags >= 0, decay ** lags.clamp(min=0), torch.zeros_like(lags))
    total = scores @ kernel.T
    if start is not None:
        total = total + start[..., None] * decay ** (steps + 1)
    return total


def output_state(cache) -> OutputState | None:
    return getattr(_holder(cache), _STATE, None)


def set_output_state(cache, state: OutputState) -> None:
    setattr(_holder(cache), _STATE, state)


def crop_output_state(cache, length: int) -> None:
    state = output_state(cache)
    if state is not None:
        state.crop(length)


def _holder(cache):
    """The object that carries the state: the stacked cache, or the hub's own cache."""
    return cache[HUB] if isinstance(cache, dict) else cache
