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
`uniform_initialisation` starts from a = 1 instead (an even blend of hub and experts): the
pipeline's default for the experts-into-hub stitches, chosen on validation (docs/stitching.md).

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

from bts.batched import (
    StackedCache,
    StackedWeights,
    attention_mask_4d,
    run_block,
    unstackable_reason,
)
from bts.errors import BtsError
from bts.heads import (
    OutputKind,
    OutputMix,
    OutputState,
    OutputStitch,
    nonnegative,
    output_state,
    running_evidence,
    set_output_state,
)
from bts.models import Decoder, check_compatible, decoder, freeze, layer_types

StitchKind = Literal["experts_into_hub", "hub_into_experts"]
EXPERTS_INTO_HUB: StitchKind = "experts_into_hub"
HUB_INTO_EXPERTS: StitchKind = "hub_into_experts"
OUTPUT = "output"  # the kind of the output stitch's gate records
HUB = "hub"
_UNSET = object()  # "argument not given" where None is a meaningful value
_CHUNK_TOKENS = 1536  # models x rows x tokens per chunk of a cache-less batched forward


@dataclass(frozen=True)
class StitchPoint:
    """A stitch layer applied to the hidden states after block `after_layer` (0-based)."""

    after_layer: int
    kind: StitchKind


GateInput = Literal["rms", "raw"]
ExpertStream = Literal["keep", "project"]


@dataclass(frozen=True)
class StitchOptions:
    """How every stitch layer of a model computes (docs/stitching.md, "Options").

    - gate_input: gates read the RMS-normalised hub state ("rms", ours) or the raw one ("raw",
      Eq. 3-4 as written);
    - gate_bias: gate linears have a bias (ours) or not (the paper's pseudo-code);
    - expert_stream: after an experts-into-hub stitch each expert's next block reads its own
      h_i ("keep", ours) or W_proj_i(h_i) ("project", Eq. 3 and the appendix pseudo-code).
    """

    gate_dropout: float = 0.1
    gate_gain: float = 1.0
    gate_input: GateInput = "rms"
    gate_bias: bool = True
    expert_stream: ExpertStream = "keep"
    # the output stitch (bts.heads): the hub's head ("hub", the paper's) or a gated mixture of
    # the hub's and the experts' own heads ("mixture"), mixed in probability or log space
    output: OutputKind = "hub"
    output_mix: OutputMix = "prob"
    output_evidence: bool = True

    def __post_init__(self):
        if self.gate_input not in ("rms", "raw"):
            raise BtsError(f"gate_input '{self.gate_input}' is unknown: use 'rms' or 'raw'")
        if self.expert_stream not in ("keep", "project"):
            raise BtsError(
                f"expert_stream '{self.expert_stream}' is unknown: use 'keep' or 'project'"
            )
        if self.output not in ("hub", "mixture"):
            raise BtsError(f"output '{self.output}' is unknown: use 'hub' or 'mixture'")
        if self.output_mix not in ("prob", "log"):
            raise BtsError(f"output_mix '{self.output_mix}' is unknown: use 'prob' or 'log'")


# The paper's layer as written (Sec. 2.3, Eq. 3-4, Appendix B): raw hub state into the gates, no
# gate bias, projected expert streams; with `random_initialisation` (nn.Linear init, a = 1).
PAPER_OPTIONS = StitchOptions(gate_input="raw", gate_bias=False, expert_stream="project")


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


def check_placement(placement: Sequence[StitchPoint], layers: int) -> None:
    """Distinct layers in range, known kinds, and an experts-into-hub stitch last: a stitch after
    it could never reach the hub's output."""
    afters = [p.after_layer for p in placement]
    if len(set(afters)) != len(afters) or not all(0 <= a < layers for a in afters):
        raise BtsError(f"stitch placement {afters} must name distinct layers in 0..{layers - 1}")
    for p in placement:
        if p.kind not in (EXPERTS_INTO_HUB, HUB_INTO_EXPERTS):
            raise BtsError(
                f"unknown stitch kind '{p.kind}': use '{EXPERTS_INTO_HUB}' or '{HUB_INTO_EXPERTS}'"
            )
    if not any(p.kind == EXPERTS_INTO_HUB for p in placement):
        raise BtsError(
            "the placement has no experts-into-hub stitch: the hub would never read the experts"
        )
    last = max(placement, key=lambda p: p.after_layer)
    if last.kind != EXPERTS_INTO_HUB:
        raise BtsError(
            f"the placement ends with a {last.kind} stitch after layer {last.after_layer}: nothing "
            "reads the experts after the last experts-into-hub stitch, so end with one"
        )


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
        _open_output(model)
    finally:
        torch.random.set_rng_state(generator_state)


def uniform_initialisation(
    model: StitchedModel, kinds: Sequence[StitchKind] = (EXPERTS_INTO_HUB, HUB_INTO_EXPERTS)
) -> None:
    """MixtureKit's starting point in our parametrisation: projections the identity and gates
    zero, as they are built, with the scales of the stitches of `kinds` at 1 (a = 1). Their
    experts-into-hub gates are then uniform over the hub and the experts (h_0 <- mean of all
    streams) and their hub-into-experts gates 1/2; the model starts from an even blend, not from
    the hub. With experts-into-hub among `kinds` the output stitch (if any) opens too: its
    weights start as BTM's posterior over the constituents' heads. An expert added later still
    enters at a = 0, so adding one leaves the trained model's output unchanged."""
    with torch.no_grad():
        for stitch in model.stitches.values():
            if stitch.kind in kinds:
                for scale in stitch.scale.values():
                    scale.fill_(1.0 / stitch.gate_gain)
    if EXPERTS_INTO_HUB in kinds:
        _open_output(model)


def _open_output(model: StitchedModel) -> None:
    """Output stitch priors at 1: its weights are BTM's posterior until the gate trains."""
    if model.output is None:
        return
    with torch.no_grad():
        for scale in model.output.scale.values():
            scale.fill_(1.0)


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


def _zero_linear(width: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(width, width, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
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
        options: StitchOptions | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.width = width
        options = options or StitchOptions(gate_dropout, gate_gain)
        self.gate_input, self.gate_bias = options.gate_input, options.gate_bias
        self.expert_stream = options.expert_stream
        gate_dropout, gate_gain = options.gate_dropout, options.gate_gain
        # Gate logits and scales are gate_gain x their stored parameters (all zero at init). Adam
        # moves every parameter about lr per step, so this is a gate learning rate gate_gain times
        # the projections': gates can saturate within a short budget while P stays near identity.
        self.gate_gain = gate_gain
        self.proj = nn.ModuleDict()
        self.gate = nn.ModuleDict()
        self.scale = nn.ParameterDict()
        self.dropout = nn.Dropout(gate_dropout)
        if kind == EXPERTS_INTO_HUB:
            self.gate[HUB] = _zero_linear(width, self.gate_bias)
        for name in experts:
            self.add_expert(name)

    @property
    def experts(self) -> list[str]:
        return list(self.proj.keys())

    def add_expert(self, name: str) -> None:
        """Fresh parameters for one expert: identity projection, zero gate, scale 0 (a no-op)."""
        self.proj[name] = _identity_linear(self.width)
        self.gate[name] = _zero_linear(self.width, self.gate_bias)
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
        bias = torch.cat([self.gate[s].bias for s in sources]) if self.gate_bias else None
        # by default gates read the RMS-normalised hub state, as the hub's own blocks do
        # (pre-norm): the residual stream's scale grows with depth and would otherwise set the
        # gates' temperature; "raw" is Eq. 3-4 as written
        read = F.rms_norm(hub, (self.width,)) if self.gate_input == "rms" else hub
        logits = self.gate_gain * F.linear(read, weight, bias)
        return self.dropout(logits.unflatten(-1, (len(sources), self.width)))

    def forward(
        self,
        hub: torch.Tensor,
        experts: dict[str, torch.Tensor],
        names: Sequence[str] | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Return the new hub state, the new expert states and the gates [..., sources, width].

        `names` restricts the layer to some experts (pruning: a left-out expert is exactly an
        expert whose scale is 0); `keep` [batch, len(names)] in {0, 1} closes an expert for some
        rows only, the same way.
        """
        names = self.experts if names is None else list(names)
        if self.kind == EXPERTS_INTO_HUB:
            return self._experts_into_hub(hub, experts, names, keep)
        return self._hub_into_experts(hub, experts, names)

    def _experts_into_hub(self, hub, experts, names, keep=None):
        logits = self._gate_logits(hub, [HUB, *names])
        # softmax with priors (1, a_1..a_n): weights exactly (1, 0, ..) at a = 0 (Eq. 3 at a = 1)
        priors = torch.stack(
            [hub.new_ones(self.width)]
            + [nonnegative(self.gate_gain * self.scale[n]) for n in names]
        )
        if keep is not None:  # per-row prior 0 for a pruned expert: [batch, 1, sources, width]
            rows = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1).to(priors.dtype)
            priors = priors * rows[:, None, :, None]
        unnormalised = priors * _stable_exp(logits, priors)
        gates = unnormalised / unnormalised.sum(dim=-2, keepdim=True)
        projected = {name: self.proj[name](experts[name]) for name in names}
        mixed = gates[..., 0, :] * hub
        for i, name in enumerate(names, start=1):
            mixed = mixed + gates[..., i, :] * projected[name]
        if self.expert_stream == "project":  # Eq. 3: expert i's next block reads P_i(h_i)
            return mixed, {**experts, **projected}, gates
        return mixed, experts, gates

    def _hub_into_experts(self, hub, experts, names):
        if not names:
            return hub, experts, hub.new_zeros(*hub.shape[:-1], 0, self.width)
        logits = self._gate_logits(hub, names)
        gates = torch.stack(
            [nonnegative(self.gate_gain * self.scale[n], upper=1.0) for n in names]
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
    past_key_values: StackedCache | dict[str, DynamicCache] | None = None
    gates: list[GateRecord] | None = field(default=None)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, transformers' convention (labels are shifted here, -100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def _check_name(name: str, taken: Sequence[str]) -> None:
    # names become keys of ModuleDict/ParameterDict, which refuse their own attribute names
    reserved = name == HUB or hasattr(nn.ParameterDict, name) or hasattr(nn.ModuleDict, name)
    if not name or "." in name or reserved:
        raise BtsError(
            f"expert name '{name}' is not allowed: use a non-empty name without '.' that is "
            "not 'hub' or a Python dict method"
        )
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
        batched: bool = True,
        options: StitchOptions | None = None,
    ):
        super().__init__()
        decoder(hub, "hub")
        self.options = options or StitchOptions(gate_dropout, gate_gain)
        gate_dropout, gate_gain = self.options.gate_dropout, self.options.gate_gain
        self.batched = batched
        self._stacked: StackedWeights | None = None
        self._unstackable: tuple | None = None  # (signature, reason) of the last refusal
        self.hub = freeze(hub)
        self.experts = nn.ModuleDict()
        self.placement = sorted(placement, key=lambda p: p.after_layer)
        self.gate_dropout = gate_dropout
        self.gate_gain = gate_gain
        self._check_placement()
        self.stitches = nn.ModuleDict(
            {
                str(p.after_layer): StitchLayer(p.kind, self.width, [], options=self.options)
                for p in self.placement
            }
        )
        opts = self.options
        self.output = (
            OutputStitch(self.width, [], opts.output_mix, opts.output_evidence)
            if opts.output == "mixture"
            else None
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
        batched: bool = True,
        options: StitchOptions | None = None,
    ) -> StitchedModel:
        """Stitch loaded causal LMs; `placement` overrides the paper's default of `num_stitches`.
        `options` (all stitch-layer settings) replaces gate_dropout and gate_gain when given."""
        if placement is None:
            points = default_placement(hub.config.num_hidden_layers, num_stitches)
        else:
            points = [
                p if isinstance(p, StitchPoint) else StitchPoint(int(p[0]), p[1]) for p in placement
            ]
        options = options or StitchOptions(gate_dropout, gate_gain)
        return cls(hub, experts, points, batched=batched, options=options)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> StitchedModel:
        """Load a directory written by `save_pretrained` (verifies each constituent's SHA-256)."""
        from bts.stitch_io import load_stitched

        return load_stitched(Path(path), **kwargs)

    def save_pretrained(self, path: str | Path, force: bool = False) -> None:
        """Write the stitch weights (safetensors) and a manifest of the constituents; an
        existing `path` is replaced only if it is a stitched directory (or with `force`)."""
        from bts.stitch_io import save_stitched

        save_stitched(self, Path(path), force=force)

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
        check_placement(self.placement, self.hub.config.num_hidden_layers)

    # --- modularity -------------------------------------------------------------------------

    def add_expert(self, name: str, model: PreTrainedModel) -> None:
        """Stitch in a new frozen expert; its fresh stitch parameters leave the output unchanged."""
        _check_name(name, self.expert_names)
        decoder(model, f"expert '{name}'")
        check_compatible(self.hub, model, name)
        self._drop_stacks()
        self.experts[name] = freeze(model)
        for stitch in self._stitch_modules():
            stitch.add_expert(name)

    def remove_expert(self, name: str) -> None:
        """Drop an expert and its stitch parameters; the gates renormalise over the rest."""
        if name not in self.experts:
            raise BtsError(f"no expert named '{name}': stitched experts are {self.expert_names}")
        if self._stacked is not None:
            self._stacked.unbind(self.experts[name])  # it keeps working on its own after removal
        self._drop_stacks()
        del self.experts[name]
        for stitch in self._stitch_modules():
            stitch.remove_expert(name)

    def stitch_parameters(self, expert: str | None = None) -> Iterator[nn.Parameter]:
        """All stitch parameters, or only those that belong to one expert."""
        if expert is None:
            for stitch in self._stitch_modules():
                yield from stitch.parameters()
            return
        for stitch in self._stitch_modules():
            yield from stitch.expert_parameters(expert)

    def _stitch_modules(self) -> list[nn.Module]:
        """The stitch layers, then the output stitch if there is one: all that trains."""
        return [*self.stitches.values(), *([self.output] if self.output is not None else [])]

    def stitch_state_dict(self) -> dict[str, torch.Tensor]:
        """What `save_pretrained` writes: the stitch layers' weights, the output stitch's under
        'output.'."""
        weights = dict(self.stitches.state_dict())
        if self.output is not None:
            weights |= {f"{OUTPUT}.{k}": v for k, v in self.output.state_dict().items()}
        return weights

    def load_stitch_state_dict(self, weights: dict[str, torch.Tensor]) -> tuple[list, list]:
        """Load `stitch_state_dict`'s weights; return (missing, unexpected) keys."""
        prefix = f"{OUTPUT}."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        rest = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        missing, unexpected = self.stitches.load_state_dict(rest, strict=False)
        if self.output is None:
            return list(missing), [*unexpected, *(prefix + k for k in own)]
        out_missing, out_unexpected = self.output.load_state_dict(own, strict=False)
        return [*missing, *(prefix + k for k in out_missing)], [
            *unexpected,
            *(prefix + k for k in out_unexpected),
        ]

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
        for stitch in self._stitch_modules():
            stitch.train(mode)
        self.hub.eval()
        self.experts.eval()
        return self

    # --- inference options --------------------------------------------------------------------

    # generate() drafts with this assistant unless told otherwise: "hub" (the stitched model's
    # own hub, no weight copy) or None (plain decoding). Greedy output is the same either way;
    # benchmarks/inference.py measured both (docs/inference.md).
    default_assistant: str | None = "hub"
    num_assistant_tokens: int = 4
    # ... but only up to this batch size: a batch keeps the smallest agreement over its rows, and
    # at batch 8 that made speculative decoding slower than plain batched decoding (measured)
    default_assistant_max_batch: int = 1
    # the batched path under autograd (training): a 16 x 128 stitch-stage step measured 1.10x
    # the loop's time (no in-place stream updates, extra stacking), so training loops by default
    batched_training: bool = False
    # skip an expert for a whole sequence when its experts-into-hub gate mass on the prompt is
    # below this (None: never); changes outputs, so off by default (docs/inference.md)
    prune_threshold: float | None = None

    def set_inference(
        self,
        *,
        batched: bool | None = None,
        batched_training: bool | None = None,
        assistant: str | nn.Module | None | object = _UNSET,
        num_assistant_tokens: int | None = None,
        assistant_max_batch: int | None = None,
        prune_threshold: float | None | object = _UNSET,
    ) -> StitchedModel:
        """Switch the inference features on this model (arguments left out stay as they are)."""
        if assistant_max_batch is not None:
            self.default_assistant_max_batch = assistant_max_batch
        if batched is not None:
            self.batched = batched
        if batched_training is not None:
            self.batched_training = batched_training
        if assistant is not _UNSET:
            self.default_assistant = assistant
        if num_assistant_tokens is not None:
            if num_assistant_tokens < 1:
                raise BtsError(f"num_assistant_tokens={num_assistant_tokens} must be at least 1")
            self.num_assistant_tokens = num_assistant_tokens
        if prune_threshold is not _UNSET:
            self.prune_threshold = prune_threshold
        return self

    @property
    def batched_reason(self) -> str | None:
        """Why forward runs the per-model loop instead of the batched path (None: it is batched)."""
        if not self.batched:
            return "batched is off"
        return None if self._stacks() is not None else self._unstackable[1]

    @property
    def expert_depth(self) -> int:
        """Blocks the experts run: the ones after the last experts-into-hub stitch cannot matter
        (unless the output stitch reads the experts' own final states)."""
        if self.output is not None:
            return self.hub.config.num_hidden_layers
        return max(p.after_layer for p in self.placement if p.kind == EXPERTS_INTO_HUB) + 1

    def _constituents(self) -> list[PreTrainedModel]:
        return [self.hub, *self.experts.values()]

    def _stacks(self) -> StackedWeights | None:
        """The stacked weights, built on first use; None when the constituents cannot stack."""
        if not self.batched:
            return None
        if self._stacked is not None and self._stacked.is_current():
            return self._stacked
        models = self._constituents()
        signature = tuple((id(m), next(m.parameters()).data_ptr()) for m in models)
        if self._unstackable is not None and self._unstackable[0] == signature:
            return None
        reason = unstackable_reason(models, self.expert_depth)
        if reason is not None:
            self._unstackable = (signature, reason)
            self._stacked = None
            return None
        # the constituents' weights become views into the stacks: built as normal tensors even
        # under inference_mode (generate), or training the model afterwards would fail
        with torch.inference_mode(False):
            self._stacked = StackedWeights(models, self.expert_depth)
        return self._stacked

    def _drop_stacks(self) -> None:
        self._stacked = None
        self._unstackable = None

    # --- forward ------------------------------------------------------------------------------

    def new_cache(self) -> StackedCache | dict[str, DynamicCache]:
        """A KV cache for incremental decoding: one stacked cache when batched, else one per model."""
        if self._stacks() is not None:
            return StackedCache()
        models = {HUB: self.hub, **self.experts}
        return {name: DynamicCache(config=m.config) for name, m in models.items()}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: StackedCache | dict[str, DynamicCache] | None = None,
        use_cache: bool = False,
        return_gates: bool = False,
        logits_to_keep: int = 0,
        expert_keep: torch.Tensor | None = None,
    ) -> StitchedOutput:
        """Logits (and loss, gates, cache). `expert_keep` [batch, experts] bool prunes experts
        per row (see `prune_threshold`); an expert pruned on every row is not run at all."""
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        names, keep = self._active_experts(expert_keep, input_ids.shape[0])
        # with autograd on and no cache (training) the loop measured faster: batched only if asked
        training = torch.is_grad_enabled() and past_key_values is None
        looped = isinstance(past_key_values, dict) or (training and not self.batched_training)
        stacks = None if looped else self._stacks()
        if isinstance(past_key_values, StackedCache) and stacks is None:
            raise BtsError(
                "this StackedCache belongs to the batched path, which is off or unavailable: "
                "start again with model.new_cache()"
            )
        args = (input_ids, attention_mask, past_key_values, return_gates, names, keep)
        if stacks is not None and past_key_values is None:
            hidden, finals, gate_records = self._run_batched_in_chunks(stacks, *args)
        elif stacks is not None:
            hidden, finals, gate_records = self._run_batched(stacks, *args)
        else:
            hidden, finals, gate_records = self._run_looped(*args)
        if self.output is None:
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = decoder(self.hub, "hub").logits(hidden)
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        else:
            streams = {HUB: hidden, **finals}
            logits, weights, loss = self._mixed_output(
                streams, names, keep, *args[:3], logits_to_keep, labels
            )
            if return_gates:
                layers = self.hub.config.num_hidden_layers
                gate_records.append(GateRecord(layers, OUTPUT, [HUB, *names], weights.detach()))
        return StitchedOutput(
            loss=loss,
            logits=logits,
            past_key_values=past_key_values if use_cache else None,
            gates=gate_records if return_gates else None,
        )

    def _mixed_output(
        self, streams, names, keep, input_ids, attention_mask, cache, logits_to_keep, labels
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The output stitch: each constituent's own head on its final stream, mixed per token.
        Returns (logits, weights, loss). With evidence every position's head runs, since the
        gate scores the whole context.

        Training (labels, autograd, probability mix) never builds the mixture over the
        vocabulary: the loss needs only each head's probability of the targets, so logits is
        None there (the [sources, batch, seq, vocab] tensors cost 3x the step time)."""
        sources, models = [HUB, *names], {HUB: self.hub, **self.experts}
        last = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        if not self.output.evidence:
            streams = {n: h[:, last] for n, h in streams.items()}
        heads = [decoder(models[n], n).logits(streams[n]).float() for n in sources]
        loss_only = labels is not None and torch.is_grad_enabled() and self.output.mix == "prob"
        if loss_only and cache is None and not logits_to_keep:
            weights, loss = self._mixture_loss(
                heads, streams[HUB], input_ids, attention_mask, labels, names, keep
            )
            return None, weights, loss
        log_probs = torch.stack([h.log_softmax(-1) for h in heads])
        del heads
        evidence = None
        if self.output.evidence:
            index = input_ids[None, :, 1:, None].expand(len(sources), -1, -1, 1)
            scored = log_probs[:, :, :-1].gather(-1, index)[..., 0]
            evidence = self._evidence(scored, log_probs, input_ids, attention_mask, cache, sources)
            log_probs, evidence = log_probs[:, :, last], evidence[..., last]
        weights = self.output.weights(streams[HUB][:, last], evidence, names, keep)
        logits = self.output(log_probs, weights)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return logits, weights, loss

    def _mixture_loss(self, heads, hub, input_ids, attention_mask, labels, names, keep):
        """(weights, loss) from each head's log-probability of the targets only."""
        normaliser = torch.stack([h.logsumexp(-1) for h in heads])[:, :, :-1]

        def scores(tokens):  # log p_m(tokens[t + 1]) at every position t but the last
            index = tokens[:, 1:, None]
            return torch.stack([h[:, :-1].gather(-1, index)[..., 0] for h in heads]) - normaliser

        evidence = None
        if self.output.evidence:
            evidence = running_evidence(scores(input_ids), input_ids, attention_mask, None)
        weights = self.output.weights(hub, evidence, names, keep)
        targets = labels[:, 1:]
        picked = scores(labels.clamp(min=0))[..., None]  # -100 (ignored) gathers any token
        token = self.output(picked, weights[:, :-1])[..., 0]
        valid = targets != -100
        return weights, -(token * valid).sum() / valid.sum().clamp(min=1)

    def _evidence(self, scored, log_probs, input_ids, attention_mask, cache, sources):
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

    def _active_experts(
        self, expert_keep: torch.Tensor | None, rows: int
    ) -> tuple[list[str], torch.Tensor | None]:
        """Experts that run (kept on some row) and the per-row 0/1 keep of those, None if all."""
        names = self.expert_names
        if expert_keep is None:
            return names, None
        if expert_keep.shape != (rows, len(names)):
            raise BtsError(
                f"expert_keep has shape {tuple(expert_keep.shape)}: expected (batch, experts) = "
                f"({rows}, {len(names)}) in the order {names}"
            )
        expert_keep = expert_keep.bool()
        running = [i for i in range(len(names)) if bool(expert_keep[:, i].any())]
        keep = expert_keep[:, running]
        return [names[i] for i in running], None if bool(keep.all()) else keep

    def _run_looped(self, input_ids, attention_mask, caches, return_gates, names, keep):
        """The reference path: each constituent's own blocks, one model after another."""
        caches = caches or {}
        past = caches[HUB].get_seq_length() if caches else 0
        position_ids = _position_ids(input_ids, attention_mask, past)
        models = {HUB: decoder(self.hub, "hub")}
        models.update({n: decoder(self.experts[n], n) for n in names})
        streams, contexts = {}, {}
        for name, dec in models.items():
            hidden = dec.embed(input_ids)
            cache = caches.get(name)
            contexts[name] = (
                dec.layer_masks(hidden, attention_mask, cache, position_ids),
                dec.rotary(hidden, position_ids),
                cache,
            )
            streams[name] = hidden

        records = []
        for index in range(self.hub.config.num_hidden_layers):
            for name, dec in models.items():
                if name != HUB and index >= self.expert_depth:
                    continue
                masks, rotary, cache = contexts[name]
                streams[name] = _run_layer(
                    dec, index, streams[name], masks, rotary, position_ids, cache
                )
            if str(index) in self.stitches:
                hub, experts = self._stitch(index, streams, names, keep, return_gates, records)
                streams[HUB] = hub
                streams.update(experts)
        return streams[HUB], self._final_streams(streams, names), records

    def _run_batched_in_chunks(self, stacks, input_ids, attention_mask, cache, gates, names, keep):
        """Cache-less forward over groups of rows: rows are independent, and [M, rows, T, d]
        temporaries of a few MB get reused by the allocator, while one large batch maps fresh
        pages on every op (page faults made 8 x 256 slower than the loop; chunks fixed that)."""
        batch, length = input_ids.shape
        step = max(1, _CHUNK_TOKENS // ((len(names) + 1) * length))
        if step >= batch:
            return self._run_batched(stacks, input_ids, attention_mask, cache, gates, names, keep)
        parts = [
            self._run_batched(
                stacks,
                input_ids[rows],
                None if attention_mask is None else attention_mask[rows],
                None,
                gates,
                names,
                None if keep is None else keep[rows],
            )
            for rows in (slice(i, i + step) for i in range(0, batch, step))
        ]
        hidden = torch.cat([p[0] for p in parts])
        experts = {n: torch.cat([p[1][n] for p in parts]) for n in parts[0][1]}
        records = [
            GateRecord(
                r.after_layer, r.kind, r.sources, torch.cat([p[2][i].weights for p in parts])
            )
            for i, r in enumerate(parts[0][2])
        ]
        return hidden, experts, records

    def _run_batched(self, stacks, input_ids, attention_mask, cache, return_gates, names, keep):
        """All constituents' blocks at one depth as one batched computation (bts.batched)."""
        active = tuple([0] + [1 + self.expert_names.index(n) for n in names])
        layers = stacks.layers_for(None if len(active) == len(self.experts) + 1 else active)
        if cache is not None:
            _align_cache(cache, active)
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = _position_ids(input_ids, attention_mask, past)
        models = [self.hub, *(self.experts[n] for n in names)]
        x = torch.stack([m.model.embed_tokens(input_ids) for m in models])
        rotary = self.hub.model.rotary_emb(x[0], position_ids)
        batch, new = input_ids.shape
        mask = attention_mask_4d(attention_mask, batch, new, past, input_ids.device)
        records, finals = [], {}
        for index, layer in enumerate(layers):
            x = run_block(stacks, layer, index, x, rotary, mask, cache)
            if str(index) not in self.stitches:
                continue
            streams = {HUB: x[0], **{n: x[i] for i, n in enumerate(names, start=1)}}
            hub, experts = self._stitch(index, streams, names, keep, return_gates, records)
            if index + 1 >= self.expert_depth:  # only the hub runs deeper
                x, finals = hub[None], self._final_streams(experts, names)
            elif torch.is_grad_enabled():  # autograd needs the old streams: a new tensor
                x = torch.stack([hub, *(experts[n] for n in names)])
            else:  # write back in place: no fresh [M, B, T, d] allocation per stitch
                for i, stream in enumerate([hub, *(experts[n] for n in names)]):
                    if stream is not streams[HUB if i == 0 else names[i - 1]]:
                        x[i].copy_(stream)
        if x.shape[0] > 1:  # the experts ran to the last block
            finals = self._final_streams({n: x[i] for i, n in enumerate(names, start=1)}, names)
        return x[0], finals, records

    def _final_streams(self, streams, names) -> dict[str, torch.Tensor]:
        """The experts' last states, kept only for the output stitch (which applies their
        heads); without it nothing reads them, and the chunked path would concatenate them."""
        return {n: streams[n] for n in names} if self.output is not None else {}

    def _stitch(self, index, streams, names, keep, return_gates, records):
        """Apply the stitch after block `index` to the streams; record its gates if asked."""
        stitch = self.stitches[str(index)]
        experts = {n: streams[n] for n in names}
        hub, experts, gates = stitch(streams[HUB], experts, names=names, keep=keep)
        if return_gates:
            sources = [HUB, *names] if stitch.kind == EXPERTS_INTO_HUB else list(names)
            records.append(GateRecord(index, stitch.kind, sources, gates.detach().mean(dim=-1)))
        return hub, experts

    def expert_keep_from_gates(
        self,
        gates: list[GateRecord],
        attention_mask: torch.Tensor | None,
        threshold: float,
    ) -> torch.Tensor:
        """Per row, keep an expert whose experts-into-hub gate mass (mean over the stitches and
        the real tokens of the forward that returned `gates`) is at least `threshold`."""
        records = [g for g in gates if g.kind == EXPERTS_INTO_HUB]
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
                for n in self.expert_names
            ],
            dim=1,
        )

    # --- generation ---------------------------------------------------------------------------

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
        assistant_model: str | nn.Module | None | object = _UNSET,
        num_assistant_tokens: int | None = None,
        prune_threshold: float | None | object = _UNSET,
        **_: object,
    ) -> torch.Tensor:
        """Greedy or sampled decoding with KV caches; returns prompt + new tokens.

        Prompts in a batch are left-padded (attention_mask 0 on the left), as in transformers.
        `assistant_model` ("hub", a causal LM with the same vocabulary, or None) drafts
        `num_assistant_tokens` tokens that one stitched forward verifies: greedy output is
        token-for-token that of plain decoding. Defaults: `default_assistant`,
        `num_assistant_tokens`, `prune_threshold` (see `set_inference`).
        """
        eos_token_id, pad_token_id = self._special_tokens(eos_token_id, pad_token_id)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        threshold = self.prune_threshold if prune_threshold is _UNSET else prune_threshold
        assistant = self._assistant(assistant_model, do_sample, use_cache, input_ids.shape[0])
        if assistant is not None:
            from bts.speculative import make_drafter, speculative_generate

            tokens, self.speculative_stats = speculative_generate(
                self,
                input_ids,
                mask,
                max_new_tokens,
                make_drafter(self, assistant),
                num_assistant_tokens or self.num_assistant_tokens,
                eos_token_id,
                pad_token_id,
                threshold,
            )
            return tokens
        return self._plain_generate(
            input_ids,
            mask,
            max_new_tokens,
            (do_sample, temperature, top_k, generator),
            eos_token_id,
            pad_token_id,
            use_cache,
            threshold,
        )

    def _special_tokens(self, eos_token_id, pad_token_id) -> tuple[int | None, int]:
        if eos_token_id is None:
            eos_token_id = self.hub.config.eos_token_id
        if isinstance(eos_token_id, list):
            eos_token_id = eos_token_id[0]
        if pad_token_id is None:
            pad_token_id = eos_token_id if eos_token_id is not None else 0
        return eos_token_id, pad_token_id

    def _assistant(self, assistant_model, do_sample: bool, use_cache: bool, rows: int):
        """The drafter to use, or None; an explicit assistant with sampling is refused."""
        sliding = any(
            "sliding_attention" in layer_types(m.config) for m in self._constituents()
        )  # a sliding-window cache cannot be rolled back past its window
        if assistant_model is _UNSET:  # the default quietly steps aside where it cannot apply
            usable = not do_sample and use_cache and not sliding
            usable = usable and rows <= self.default_assistant_max_batch
            return self.default_assistant if usable else None
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

    def _plain_generate(
        self,
        input_ids,
        mask,
        max_new_tokens,
        sampling,
        eos_token_id,
        pad_token_id,
        use_cache,
        threshold,
    ) -> torch.Tensor:
        """One stitched forward per new token (with pruning decided on the prompt, if asked)."""
        tokens, caches = input_ids, (self.new_cache() if use_cache else None)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        keep = None
        for step in range(max_new_tokens):
            fresh = tokens if (step == 0 or not use_cache) else tokens[:, -1:]
            out = self(
                fresh,
                attention_mask=mask,
                past_key_values=caches,
                use_cache=use_cache,
                logits_to_keep=1,
                return_gates=step == 0 and threshold is not None,
                expert_keep=keep,
            )
            if step == 0 and threshold is not None:
                keep = self.expert_keep_from_gates(out.gates, mask, threshold)
            next_token = _choose(out.logits[:, -1].float(), *sampling)
            tokens, mask, finished = append_token(
                tokens, mask, finished, next_token, eos_token_id, pad_token_id
            )
            if finished.all():
                break
        return tokens


def append_token(tokens, mask, finished, next_token, eos_token_id, pad_token_id):
    """Append one token per row; rows that produced EOS before get padding from then on."""
    if eos_token_id is not None:
        next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        finished = finished | (next_token == eos_token_id)
    tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    mask = torch.cat([mask, torch.ones_like(next_token[:, None])], dim=1)
    return tokens, mask, finished


def _align_cache(cache: StackedCache, active: tuple[int, ...]) -> None:
    """A cache filled with more experts than now run (pruning after the prompt) drops them."""
    if cache.models is None or cache.get_seq_length() == 0:
        cache.models = active
        return
    if cache.models == active:
        return
    if not set(active) <= set(cache.models):
        raise BtsError(
            "the cache holds fewer experts than this forward runs: an expert pruned earlier in "
            "a sequence cannot come back; start again with model.new_cache()"
        )
    cache.keep_models([cache.models.index(m) for m in active])
    cache.models = active


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
