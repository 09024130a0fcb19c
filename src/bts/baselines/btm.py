"""Branch-Train-Merge output ensemble (arXiv 2208.03306), as the BTS paper runs it.

The seed and its experts stay separate models; their next-token distributions are mixed with
Bayesian weights, the posterior probability of each model given the context so far:

    p(x_t | x_<t) = sum_m w_m(t) p_m(x_t | x_<t),
    w_m(t) ∝ prior_m * prod_{s<t} p_m(x_s | x_<s),   prior uniform.

Everything is computed in log space (logsumexp), per sequence, and padded positions (left
padding, attention_mask 0) contribute nothing. Nothing trains. See docs/baselines.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from bts.baselines import check_family
from bts.baselines.registry import Hooks
from bts.errors import BtsError
from bts.generation import append_token, special_tokens
from bts.models import causal_lm_loss, freeze, load_causal_lm, position_ids

SEED = "seed"


@dataclass
class EnsembleOutput:
    """`logits` are log mixture probabilities [batch, seq, vocab]; `loss` the shifted LM loss."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    posterior: torch.Tensor | None = None  # [batch, seq, n_models]


def token_loglik(log_probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(x_j | x_<j) at each position j [batch, seq]; 0 where x_j or its context is padding.

    Position 0 (and each row's first real token) has no context inside the sequence, so it
    scores nothing: the posterior at the first position is the prior.
    """
    scored = log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    scored = torch.where(valid, scored, torch.zeros_like(scored))
    return F.pad(scored, (1, 0))


def _check_names(names) -> None:
    for name in names:
        if not name or "." in name:
            raise BtsError(f"model name {name!r} is not allowed: use a non-empty name without '.'")


class BTMEnsemble(nn.Module):
    """Frozen constituents whose next-token distributions are mixed with posterior weights."""

    def __init__(self, models: Mapping[str, PreTrainedModel]):
        super().__init__()
        if not models:
            raise BtsError("BTM needs at least one model: pass the seed and its experts")
        _check_names(models)
        self.models = nn.ModuleDict({name: freeze(m) for name, m in models.items()})
        self.names = list(models)
        self.config = next(iter(models.values())).config  # context length etc. for evaluation
        self.log_prior = -math.log(len(models))  # uniform prior over the constituents

    def train(self, mode: bool = True) -> BTMEnsemble:
        """Nothing trains: constituents always run in eval mode (no dropout)."""
        self.training = mode
        self.models.eval()
        return self

    def active_parameters(self) -> int:
        """Every constituent runs on every token."""
        return sum(p.numel() for m in self.models.values() for p in m.parameters())

    def _constituent_log_probs(self, model, input_ids, mask, **kwargs) -> torch.Tensor:
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids(input_ids, mask),
            **kwargs,
        )
        return out.logits.float().log_softmax(-1)

    def _log_evidence(self, input_ids, mask):
        """Yield (log p_m [b, t, v], cumulative log-likelihood of the context [b, t]) per model."""
        for model in self.models.values():
            log_probs = self._constituent_log_probs(model, input_ids, mask)
            yield log_probs, token_loglik(log_probs, input_ids, mask).cumsum(-1)

    def posterior(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """w_m at each position [batch, seq, n_models]: weights for predicting the next token."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        evidence = torch.stack([cum for _, cum in self._log_evidence(input_ids, mask)], -1)
        return (self.log_prior + evidence).softmax(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> EnsembleOutput:
        """Log mixture probabilities; memory of two models' log-probs, whatever the count.

        The mixture accumulates model by model: log sum_m exp(c_m + log p_m) with c_m the
        context log-likelihood relative to the first model's (so terms stay near 0 in float32),
        then subtracts log sum_m exp(c_m), the posterior's normaliser.
        """
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        mixed, evidence, reference = None, [], None
        for log_probs, cum in self._log_evidence(input_ids, mask):
            reference = cum if reference is None else reference
            relative = cum - reference
            evidence.append(relative)
            term = relative[..., None] + log_probs
            mixed = term if mixed is None else torch.logaddexp(mixed, term)
        evidence = torch.stack(evidence, -1)
        logits = mixed - evidence.logsumexp(-1)[..., None]
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return EnsembleOutput(logits=logits, loss=loss, posterior=evidence.softmax(-1))

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Greedy decoding (prompt + new tokens), one KV cache per constituent; left padding."""
        if do_sample:
            raise BtsError("BTM generation is greedy only: pass do_sample=False")
        eos, pad = special_tokens(self.config, eos_token_id, pad_token_id)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        caches = {name: DynamicCache(config=m.config) for name, m in self.models.items()}
        state = self._prefill(input_ids, mask, caches)
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = _mixture_last(*state).argmax(-1)
            tokens, mask, finished = append_token(tokens, mask, finished, next_token, eos, pad)
            if finished.all() or step == max_new_tokens - 1:
                break
            state = self._extend(next_token, mask, caches, *state)
        return tokens

    def _prefill(self, input_ids, mask, caches):
        """(context log-likelihood [m, b], next-token log-probs [m, b, v]) after the prompt."""
        cums, lasts = [], []
        for name, model in self.models.items():
            log_probs = self._constituent_log_probs(
                model, input_ids, mask, past_key_values=caches[name], use_cache=True
            )
            cums.append(token_loglik(log_probs, input_ids, mask).sum(-1))
            lasts.append(log_probs[:, -1])
        return torch.stack(cums), torch.stack(lasts)

    def _extend(self, token, mask, caches, cums, lasts):
        """Score the chosen token under each model, then feed it through each model's cache."""
        cums = cums + lasts.gather(-1, token[None, :, None].expand(len(cums), -1, 1)).squeeze(-1)
        positions = position_ids(token[:, None], mask)
        new_lasts = []
        for name, model in self.models.items():
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=caches[name],
                use_cache=True,
            )
            new_lasts.append(out.logits[:, -1].float().log_softmax(-1))
        return cums, torch.stack(new_lasts)


def _mixture_last(cums: torch.Tensor, lasts: torch.Tensor) -> torch.Tensor:
    """log sum_m w_m p_m(next) [b, v] from context log-likelihoods [m, b] and log-probs [m, b, v]."""
    log_weights = cums.log_softmax(0)  # the uniform prior cancels in the normalisation
    return (log_weights[..., None] + lasts).logsumexp(0)


def load_btm(seed_dir: Path, expert_dirs: Mapping[str, Path]) -> BTMEnsemble:
    """The ensemble of the seed (named 'seed', first) and the experts, in the order given."""
    check_family(Path(seed_dir), expert_dirs, "stitch")
    if SEED in expert_dirs:
        raise BtsError(f"an expert is named {SEED!r}: rename it, that name is the seed's")
    models = {SEED: load_causal_lm(seed_dir)}
    models |= {name: load_causal_lm(path) for name, path in expert_dirs.items()}
    return BTMEnsemble(models)


HOOKS = Hooks(assemble=load_btm)  # nothing to build or train: made from the seed and experts
