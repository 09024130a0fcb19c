"""Branch-Train-Stitch: stitch layers over a frozen hub and frozen experts (arXiv 2502.00075).

The hub and the experts run side by side, layer by layer. After some layers a stitch layer mixes
their hidden states (paper Eq. 3 and 4):

* experts-into-hub:  h_0 <- sum_i g_i * P_i(h_i),      g = softmax_i(W_gate_i(h_0))  (P_0 = I)
* hub-into-experts:  h_i <- (1 - s_i) * h_i + s_i * P'_i(h_0),   s_i = sigmoid(W_gate_i(h_0))

Gates are per hidden dimension and computed from the hub's state only (RMS-normalised first: the
paper states no norm, docs/stitching.md says why). Logits come from the hub's final norm and LM
head. Only stitch parameters train; hub and experts are frozen.

Our addition for initialisation (docs/stitching.md): a per-expert, per-dimension scale a_i >= 0, initialised to 0,
that weights expert i inside the softmax (g_i = a_i e^{l_i} / (e^{l_0} + sum_j a_j e^{l_j})) and
scales the sigmoid gate (s_i = a_i * sigmoid(l_i)). At a = 0 the stitched model is exactly the hub;
at a = 1 it is exactly the paper's equations; the gradient with respect to a is non-zero at 0, so
the gates open from the first step. Because a new expert enters with a = 0, adding one leaves the
output unchanged, and removing one renormalises the softmax over the sources that are left.

This module does no I/O; `bts.stitch_io` saves and loads stitched models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput

from bts.errors import BtsError
from bts.models import Decoder, check_compatible, decoder, freeze

StitchKind = Literal["experts_into_hub", "hub_into_experts"]
EXPERTS_INTO_HUB: StitchKind = "experts_into_hub"
HUB_INTO_EXPERTS: StitchKind = "hub_into_experts"
HUB = "hub"


@dataclass(frozen=True)
class StitchPoint:
    """A stitch layer applied to the hidden states after block `after_layer` (0-based)."""

    after_layer: int
    kind: StitchKind


def default_placement(num_layers: int, num_stitches: int = 4) -> list[StitchPoint]:
    """Paper placement: one stitch every floor(L/K) blocks, kinds alternating, last experts-into-hub.

    The last stitch always sits after the final block (before the hub's final norm), also when K
    does not divide L.
    """
    if not 1 <= num_stitches <= num_layers:
        raise BtsError(
            f"num_stitches={num_stitches} must be between 1 and the number of layers ({num_layers})"
        )
    every = num_layers // num_stitches
    afters = [every * (k + 1) - 1 for k in range(num_stitches - 1)] + [num_layers - 1]
    kinds = [
        EXPERTS_INTO_HUB if (num_stitches - 1 - k) % 2 == 0 else HUB_INTO_EXPERTS
        for k in range(num_stitches)
    ]
    return [StitchPoint(a, k) for a, k in zip(afters, kinds, strict=True)]


def random_initialisation(model: StitchedModel, seed: int = 0) -> None:
    """The paper's plain init (Eq. 3-4 as written): nn.Linear's default for every projection and
    gate, scales at 1 (a = 1). The stitched model then no longer starts as the hub; ablations
    compare it with our identity initialisation (docs/stitching.md)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for stitch in model.stitches.values():
            for linear in [*stitch.proj.values(), *stitch.gate.values()]:
                linear.reset_parameters()
            for scale in stitch.scale.values():
                nn.init.constant_(scale, 1.0 / stitch.gate_gain)
    finally:
        torch.random.set_rng_state(generator_state)


def _nonnegative(raw: torch.Tensor, upper: float | None = None) -> torch.Tensor:
    """Clamp to [0, upper] in the forward pass, identity gradient (projected gradient descent).

    A plain clamp would zero the gradient below 0 and leave a scale that stepped negative dead.
    """
    return raw + (raw.clamp(0.0, upper) - raw).detach()


def _stable_exp(logits: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """exp(logits - m), shifted by the largest prior-weighted logit so that the softmax's
    denominator is at least 1 (the hub's prior is 1, so m is finite); a source with prior 0 and a
    huge logit is clamped rather than overflowing to inf * 0 = nan."""
    shift = (logits + priors.log()).amax(dim=-2, keepdim=True).detach()
    return torch.exp((logits - shift).clamp(max=60.0))


def _identity_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(width))
    return layer


def _zero_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class StitchLayer(nn.Module):
    """One stitch layer: per-expert projections, per-source gates and per-expert scales."""

    def __init__(
        self,
        kind: StitchKind,
        width: int,
        experts: Sequence[str],
        gate_dropout: float = 0.1,
        gate_gain: float = 1.0,
    ):
        super().__init__()
        self.kind = kind
        self.width = width
        # Gate logits and scales are gate_gain x their stored parameters (all zero at init). Adam
        # moves every parameter about lr per step, so this is a gate learning rate gate_gain times
        # the projections': gates can saturate within a short budget while P stays near identity.
        self.gate_gain = gate_gain
        self.proj = nn.ModuleDict()
        self.gate = nn.ModuleDict()
        self.scale = nn.ParameterDict()
        self.dropout = nn.Dropout(gate_dropout)
        if kind == EXPERTS_INTO_HUB:
            self.gate[HUB] = _zero_linear(width)
        for name in experts:
            self.add_expert(name)

    @property
    def experts(self) -> list[str]:
        return list(self.proj.keys())

    def add_expert(self, name: str) -> None:
        """Fresh parameters for one expert: identity projection, zero gate, scale 0 (a no-op)."""
        self.proj[name] = _identity_linear(self.width)
        self.gate[name] = _zero_linear(self.width)
        self.scale[name] = nn.Parameter(torch.zeros(self.width))

    def remove_expert(self, name: str) -> None:
        for params in (self.proj, self.gate, self.scale):
            del params[name]

    def expert_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.proj[name].parameters()
        yield from self.gate[name].parameters()
        yield self.scale[name]

    def _gate_logits(self, hub: torch.Tensor, sources: list[str]) -> torch.Tensor:
        """Gate logits of shape [..., len(sources), width], all from the hub's state, one matmul."""
        weight = torch.cat([self.gate[s].weight for s in sources])
        bias = torch.cat([self.gate[s].bias for s in sources])
        # gates read the RMS-normalised hub state, as the hub's own blocks do (pre-norm): the
        # residual stream's scale grows with depth and would otherwise set the gates' temperature
        logits = self.gate_gain * F.linear(F.rms_norm(hub, (self.width,)), weight, bias)
        return self.dropout(logits.unflatten(-1, (len(sources), self.width)))

    def forward(
        self, hub: torch.Tensor, experts: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Return the new hub state, the new expert states and the gates [..., sources, width]."""
        if self.kind == EXPERTS_INTO_HUB:
            return self._experts_into_hub(hub, experts)
        return self._hub_into_experts(hub, experts)

    def _experts_into_hub(self, hub, experts):
        names = self.experts
        logits = self._gate_logits(hub, [HUB, *names])
        # softmax with priors (1, a_1..a_n): weights exactly (1, 0, ..) at a = 0 (Eq. 3 at a = 1)
        priors = torch.stack(
            [hub.new_ones(self.width)]
            + [_nonnegative(self.gate_gain * self.scale[n]) for n in names]
        )
        unnormalised = priors * _stable_exp(logits, priors)
        gates = unnormalised / unnormalised.sum(dim=-2, keepdim=True)
        mixed = gates[..., 0, :] * hub
        for i, name in enumerate(names, start=1):
            mixed = mixed + gates[..., i, :] * self.proj[name](experts[name])
        return mixed, experts, gates

    def _hub_into_experts(self, hub, experts):
        names = self.experts
        if not names:
            return hub, experts, hub.new_zeros(*hub.shape[:-1], 0, self.width)
        logits = self._gate_logits(hub, names)
        gates = torch.stack(
            [_nonnegative(self.gate_gain * self.scale[n], upper=1.0) for n in names]
        ) * torch.sigmoid(logits)
        updated = {
            # (1 - s) h_i + s P'_i(h_0), written so that s = 0 returns h_i bit for bit (Eq. 4)
            name: experts[name] + gates[..., i, :] * (self.proj[name](hub) - experts[name])
            for i, name in enumerate(names)
        }
        return hub, updated, gates


@dataclass
class GateRecord:
    """Gates of one stitch layer for one forward pass, averaged over the hidden dimension."""

    after_layer: int
    kind: StitchKind
    sources: list[str]
    weights: torch.Tensor  # [batch, seq, len(sources)]


@dataclass
class StitchedOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: dict[str, DynamicCache] | None = None
    gates: list[GateRecord] | None = field(default=None)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, transformers' convention (labels are shifted here, -100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def _check_name(name: str, taken: Sequence[str]) -> None:
    if not name or "." in name or name == HUB:
        raise BtsError(f"expert name '{name}' is not allowed: use a non-empty name without '.'")
    if name in taken:
        raise BtsError(f"an expert named '{name}' is already stitched: remove it first")


class StitchedModel(nn.Module):
    """A frozen hub and frozen experts joined by trainable stitch layers (hub-and-spoke)."""

    def __init__(
        self,
        hub: PreTrainedModel,
        experts: dict[str, PreTrainedModel],
        placement: Sequence[StitchPoint],
        gate_dropout: float = 0.1,
        gate_gain: float = 1.0,
    ):
        super().__init__()
        decoder(hub, "hub")
        self.hub = freeze(hub)
        self.experts = nn.ModuleDict()
        self.placement = sorted(placement, key=lambda p: p.after_layer)
        self.gate_dropout = gate_dropout
        self.gate_gain = gate_gain
        self._check_placement()
        self.stitches = nn.ModuleDict(
            {
                str(p.after_layer): StitchLayer(p.kind, self.width, [], gate_dropout, gate_gain)
                for p in self.placement
            }
        )
        for name, model in experts.items():
            self.add_expert(name, model)

    @classmethod
    def from_models(
        cls,
        hub: PreTrainedModel,
        experts: dict[str, PreTrainedModel],
        *,
        placement: Sequence[StitchPoint | tuple[int, str]] | None = None,
        num_stitches: int = 4,
        gate_dropout: float = 0.1,
        gate_gain: float = 1.0,
    ) -> StitchedModel:
        """Stitch loaded causal LMs; `placement` overrides the paper's default of `num_stitches`."""
        if placement is None:
            points = default_placement(hub.config.num_hidden_layers, num_stitches)
        else:
            points = [
                p if isinstance(p, StitchPoint) else StitchPoint(int(p[0]), p[1]) for p in placement
            ]
        return cls(hub, experts, points, gate_dropout, gate_gain)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> StitchedModel:
        """Load a directory written by `save_pretrained` (verifies each constituent's SHA-256)."""
        from bts.stitch_io import load_stitched

        return load_stitched(Path(path), **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the stitch weights (safetensors) and a manifest of the constituents."""
        from bts.stitch_io import save_stitched

        save_stitched(self, Path(path))

    @property
    def config(self):
        return self.hub.config

    @property
    def width(self) -> int:
        return self.hub.config.hidden_size

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts.keys())

    def _check_placement(self) -> None:
        layers = self.hub.config.num_hidden_layers
        afters = [p.after_layer for p in self.placement]
        if len(set(afters)) != len(afters) or not all(0 <= a < layers for a in afters):
            raise BtsError(
                f"stitch placement {afters} must name distinct layers in 0..{layers - 1}"
            )
        for p in self.placement:
            if p.kind not in (EXPERTS_INTO_HUB, HUB_INTO_EXPERTS):
                raise BtsError(
                    f"unknown stitch kind '{p.kind}': use '{EXPERTS_INTO_HUB}' or '{HUB_INTO_EXPERTS}'"
                )
        if not any(p.kind == EXPERTS_INTO_HUB for p in self.placement):
            raise BtsError(
                "the placement has no experts-into-hub stitch: the hub would never read the experts"
            )

    # --- modularity -------------------------------------------------------------------------

    def add_expert(self, name: str, model: PreTrainedModel) -> None:
        """Stitch in a new frozen expert; its fresh stitch parameters leave the output unchanged."""
        _check_name(name, self.expert_names)
        decoder(model, f"expert '{name}'")
        check_compatible(self.hub, model, name)
        self.experts[name] = freeze(model)
        for stitch in self.stitches.values():
            stitch.add_expert(name)

    def remove_expert(self, name: str) -> None:
        """Drop an expert and its stitch parameters; the gates renormalise over the rest."""
        if name not in self.experts:
            raise BtsError(f"no expert named '{name}': stitched experts are {self.expert_names}")
        del self.experts[name]
        for stitch in self.stitches.values():
            stitch.remove_expert(name)

    def stitch_parameters(self, expert: str | None = None) -> Iterator[nn.Parameter]:
        """All stitch parameters, or only those that belong to one expert."""
        if expert is None:
            yield from self.stitches.parameters()
            return
        for stitch in self.stitches.values():
            yield from stitch.expert_parameters(expert)

    def train_only(self, expert: str | None = None) -> int:
        """Make only the stitch parameters (of one expert, if named) trainable; return their count."""
        self.requires_grad_(False)
        params = list(self.stitch_parameters(expert))
        for p in params:
            p.requires_grad_(True)
        return sum(p.numel() for p in params)

    def train(self, mode: bool = True) -> StitchedModel:
        """Only the stitches switch modes; frozen constituents always run in eval mode."""
        self.training = mode
        self.stitches.train(mode)
        self.hub.eval()
        self.experts.eval()
        return self

    # --- forward ------------------------------------------------------------------------------

    def new_cache(self) -> dict[str, DynamicCache]:
        """A KV cache per constituent, for incremental decoding."""
        models = {HUB: self.hub, **self.experts}
        return {name: DynamicCache(config=m.config) for name, m in models.items()}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: dict[str, DynamicCache] | None = None,
        use_cache: bool = False,
        return_gates: bool = False,
        logits_to_keep: int = 0,
    ) -> StitchedOutput:
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        caches = past_key_values or {}
        past = caches[HUB].get_seq_length() if caches else 0
        position_ids = _position_ids(input_ids, attention_mask, past)
        # experts' blocks after the last stitch that reads them cannot reach the output
        expert_depth = max(p.after_layer for p in self.placement if p.kind == EXPERTS_INTO_HUB) + 1

        streams = {}
        models = {HUB: decoder(self.hub, "hub")}
        models.update({n: decoder(m, n) for n, m in self.experts.items()})
        contexts = {}
        for name, dec in models.items():
            hidden = dec.embed(input_ids)
            cache = caches.get(name)
            contexts[name] = (
                dec.layer_masks(hidden, attention_mask, cache, position_ids),
                dec.rotary(hidden, position_ids),
                cache,
            )
            streams[name] = hidden

        gate_records = []
        for index in range(self.hub.config.num_hidden_layers):
            for name, dec in models.items():
                if name != HUB and index >= expert_depth:
                    continue
                masks, rotary, cache = contexts[name]
                streams[name] = _run_layer(
                    dec, index, streams[name], masks, rotary, position_ids, cache
                )
            stitch = self.stitches[str(index)] if str(index) in self.stitches else None
            if stitch is None:
                continue
            experts = {n: streams[n] for n in stitch.experts}
            hub, experts, gates = stitch(streams[HUB], experts)
            streams[HUB] = hub
            streams.update(experts)
            if return_gates:
                sources = (
                    [HUB, *stitch.experts] if stitch.kind == EXPERTS_INTO_HUB else stitch.experts
                )
                gate_records.append(
                    GateRecord(index, stitch.kind, sources, gates.detach().mean(dim=-1))
                )

        hidden = streams[HUB]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = models[HUB].logits(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return StitchedOutput(
            loss=loss,
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
            gates=gate_records if return_gates else None,
        )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with one KV cache per constituent; returns prompt + new tokens.

        Prompts in a batch are left-padded (attention_mask 0 on the left), as in transformers.
        """
        if eos_token_id is None:
            eos_token_id = self.hub.config.eos_token_id
        if isinstance(eos_token_id, list):
            eos_token_id = eos_token_id[0]
        if pad_token_id is None:
            pad_token_id = eos_token_id if eos_token_id is not None else 0
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        tokens, caches = input_ids, (self.new_cache() if use_cache else None)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            fresh = tokens if (step == 0 or not use_cache) else tokens[:, -1:]
            out = self(
                fresh,
                attention_mask=mask,
                past_key_values=caches,
                use_cache=use_cache,
                logits_to_keep=1,
            )
            next_token = _choose(
                out.logits[:, -1].float(), do_sample, temperature, top_k, generator
            )
            if eos_token_id is not None:
                next_token = torch.where(
                    finished, torch.full_like(next_token, pad_token_id), next_token
                )
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=1)
            if finished.all():
                break
        return tokens


def _position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int
) -> torch.Tensor:
    """Positions count real tokens only, so left-padded prompts get the positions they would alone."""
    length = input_ids.shape[1]
    if attention_mask is None:
        return torch.arange(past, past + length, device=input_ids.device)[None].expand(
            input_ids.shape[0], -1
        )
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -length:]


def _run_layer(
    dec: Decoder, index: int, hidden, masks, rotary, position_ids, cache
) -> torch.Tensor:
    out = dec.layers[index](
        hidden,
        attention_mask=masks[index],
        position_embeddings=rotary,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return out[0] if isinstance(out, tuple) else out


def _choose(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, generator
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
