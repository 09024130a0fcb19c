"""Branch-Train-Stitch: stitch layers over a frozen hub and frozen experts (arXiv 2502.00075).

The hub and the experts run side by side, layer by layer. After some layers a stitch layer mixes
their hidden states (paper Eq. 3 and 4):

* experts-into-hub:  h_0 <- sum_i g_i * P_i(h_i),      g = softmax_i(W_gate_i(h_0))  (P_0 = I)
* hub-into-experts:  h_i <- (1 - s_i) * h_i + s_i * P'_i(h_0),   s_i = sigmoid(W_gate_i(h_0))

Gates are per hidden dimension and computed from the hub's state only (RMS-normalised first: the
paper states no norm, docs/stitching.md says why). Logits come from the hub's final norm and LM
head. Only stitch parameters train; hub and experts are frozen. An expert may have another width
(P_i is d_0 x d_i) or depth (a stitch after hub block l reads it after block depth_maps[i][k], at
the same relative depth by default): docs/bring-your-own.md.

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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput

from bts.arch import adapter, check_compatible
from bts.batched import BatchedExecutor, StackedCache
from bts.errors import BtsError
from bts.generation import InferenceOptions, generate
from bts.heads import OutputStitch, mixed_output, nonnegative
from bts.models import HUB, causal_lm_loss, freeze, position_ids
from bts.spec import (
    EXPERTS_INTO_HUB,
    HUB_INTO_EXPERTS,
    PAPER_SPEC,
    StitchKind,
    StitchPoint,
    StitchSpec,
    check_depth_map,
    check_placement,
    default_placement,
    depth_map,
)

__all__ = [  # re-exported: where users and the tests have always found them
    "EXPERTS_INTO_HUB", "HUB", "HUB_INTO_EXPERTS", "PAPER_SPEC", "StitchPoint", "StitchSpec",
    "causal_lm_loss", "check_placement", "default_placement",
]
OUTPUT = "output"  # the kind of the output stitch's gate records


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


def initialise(model: StitchedModel, init: str, seed: int = 0) -> None:
    """Start fresh stitch parameters as `StitchSpec.init` names (bts.spec.Init)."""
    if init == "random":
        random_initialisation(model, seed)
    elif init == "uniform":
        uniform_initialisation(model)
    elif init == "uniform_into_hub":  # experts-into-hub blended, hub-into-experts closed
        uniform_initialisation(model, kinds=[EXPERTS_INTO_HUB])


def _stable_exp(logits: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """exp(logits - m), shifted by the largest prior-weighted logit so that the softmax's
    denominator is at least 1 (the hub's prior is 1, so m is finite); a source with prior 0 and a
    huge logit is clamped rather than overflowing to inf * 0 = nan."""
    shift = (logits + priors.log()).amax(dim=-2, keepdim=True).detach()
    return torch.exp((logits - shift).clamp(max=60.0))


def _identity_linear(inputs: int, outputs: int) -> nn.Linear:
    """The identity on the leading min(inputs, outputs) dimensions, zero elsewhere: I itself
    when the widths agree. A rectangular identity is semi-orthogonal (singular values 1, as a
    random orthogonal map's) without a random draw, and a round trip hub -> wider expert -> hub
    is the identity (docs/bring-your-own.md)."""
    layer = nn.Linear(inputs, outputs, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(outputs, inputs))
    return layer


def _zero_linear(inputs: int, outputs: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(inputs, outputs, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class StitchLayer(nn.Module):
    """One stitch layer: per-expert projections, per-source gates and per-expert scales.
    `width` is the hub's; an expert of another width d_i gets P_i: d_i -> d_0 (experts-into-hub)
    or P'_i: d_0 -> d_i and a d_i-wide gate and scale (hub-into-experts). Gates read the hub."""

    def __init__(
        self,
        kind: StitchKind,
        width: int,
        experts: Sequence[str],
        gate_dropout: float = 0.1,
        gate_gain: float = 1.0,
        spec: StitchSpec | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.width = width
        spec = spec or StitchSpec(gate_dropout=gate_dropout, gate_gain=gate_gain)
        self.gate_input, self.gate_bias = spec.gate_input, spec.gate_bias
        self.expert_stream = spec.expert_stream
        gate_dropout, gate_gain = spec.gate_dropout, spec.gate_gain
        # Gate logits and scales are gate_gain x their stored parameters (all zero at init). Adam
        # moves every parameter about lr per step, so this is a gate learning rate gate_gain times
        # the projections': gates can saturate within a short budget while P stays near identity.
        self.gate_gain = gate_gain
        self.proj = nn.ModuleDict()
        self.gate = nn.ModuleDict()
        self.scale = nn.ParameterDict()
        self.dropout = nn.Dropout(gate_dropout)
        if kind == EXPERTS_INTO_HUB:
            self.gate[HUB] = _zero_linear(width, width, self.gate_bias)
        for name in experts:
            self.add_expert(name)

    @property
    def experts(self) -> list[str]:
        return list(self.proj.keys())

    def add_expert(self, name: str, width: int | None = None) -> None:
        """Fresh parameters for one expert of `width` (the hub's if None): identity projection,
        zero gate, scale 0 (a no-op). Experts-into-hub mixes in the hub's d_0 dimensions;
        hub-into-experts writes the expert's d_i."""
        width = width or self.width
        into_hub = self.kind == EXPERTS_INTO_HUB
        self.proj[name] = _identity_linear(width, self.width) if into_hub else _identity_linear(
            self.width, width)
        mixed = self.width if into_hub else width
        self.gate[name] = _zero_linear(self.width, mixed, self.gate_bias)
        self.scale[name] = nn.Parameter(torch.zeros(mixed))

    def remove_expert(self, name: str) -> None:
        for params in (self.proj, self.gate, self.scale):
            del params[name]

    def expert_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.proj[name].parameters()
        yield from self.gate[name].parameters()
        yield self.scale[name]

    def _gate_logits(self, hub: torch.Tensor, sources: list[str]) -> torch.Tensor:
        """Gate logits [..., sum of the sources' gate widths], all from the hub's state, in one
        matmul (each source's block in order)."""
        weight = torch.cat([self.gate[s].weight for s in sources])
        bias = torch.cat([self.gate[s].bias for s in sources]) if self.gate_bias else None
        # by default gates read the RMS-normalised hub state, as the hub's own blocks do
        # (pre-norm): the residual stream's scale grows with depth and would otherwise set the
        # gates' temperature; "raw" is Eq. 3-4 as written
        read = F.rms_norm(hub, (self.width,)) if self.gate_input == "rms" else hub
        return self.dropout(self.gate_gain * F.linear(read, weight, bias))

    def forward(self, hub: torch.Tensor, experts: dict[str, torch.Tensor], names=None, keep=None):
        """(new hub state, new expert states, gates): experts-into-hub gates [..., sources, d_0],
        hub-into-experts one [..., d_i] per expert (the widths may differ). `names` restricts
        the layer to some experts (pruning: a left-out expert is exactly one whose scale is 0);
        `keep` [batch, len(names)] in {0, 1} closes an expert for some rows only, the same way."""
        names = self.experts if names is None else list(names)
        if self.kind == EXPERTS_INTO_HUB:
            return self._experts_into_hub(hub, experts, names, keep)
        return self._hub_into_experts(hub, experts, names)

    def _experts_into_hub(self, hub, experts, names, keep=None):
        logits = self._gate_logits(hub, [HUB, *names]).unflatten(-1, (len(names) + 1, self.width))
        # softmax with priors (1, a_1..a_n): weights exactly (1, 0, ..) at a = 0 (Eq. 3 at a = 1)
        scales = [nonnegative(self.gate_gain * self.scale[n]) for n in names]
        priors = torch.stack([hub.new_ones(self.width), *scales])
        if keep is not None:  # per-row prior 0 for a pruned expert: [batch, 1, sources, width]
            rows = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1).to(priors.dtype)
            priors = priors * rows[:, None, :, None]
        unnormalised = priors * _stable_exp(logits, priors)
        gates = unnormalised / unnormalised.sum(dim=-2, keepdim=True)
        projected = {name: self.proj[name](experts[name]) for name in names}
        mixed = gates[..., 0, :] * hub
        for i, name in enumerate(names, start=1):
            mixed = mixed + gates[..., i, :] * projected[name]
        # Eq. 3: expert i's next block reads P_i(h_i) ("project"); ours keeps reading h_i
        streams = {**experts, **projected} if self.expert_stream == "project" else experts
        return mixed, streams, gates

    def _hub_into_experts(self, hub, experts, names):
        if not names:
            return hub, experts, hub.new_zeros(*hub.shape[:-1], 0, self.width)
        scales = torch.cat([nonnegative(self.gate_gain * self.scale[n], upper=1.0) for n in names])
        gates = (scales * torch.sigmoid(self._gate_logits(hub, names))).split(
            [self.scale[n].shape[0] for n in names], dim=-1)
        # (1 - s) h_i + s P'_i(h_0), written so that s = 0 returns h_i bit for bit (Eq. 4)
        updated = {name: experts[name] + gates[i] * (self.proj[name](hub) - experts[name])
                   for i, name in enumerate(names)}
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
    """A frozen hub and frozen experts joined by trainable stitch layers (hub-and-spoke): the
    model only. How it runs is `inference` (bts.generation), its batched path `executor`
    (bts.batched); bts.stitch_io saves and loads it."""

    def __init__(
        self,
        hub: PreTrainedModel,
        experts: dict[str, PreTrainedModel],
        spec: StitchSpec | None = None,
        inference: InferenceOptions | None = None,
    ):
        super().__init__()
        adapter(hub, HUB)
        self.hub = freeze(hub)
        self.spec = (spec or StitchSpec()).resolve(hub.config.num_hidden_layers)
        self.placement = list(self.spec.placement)
        self.inference = inference or InferenceOptions()
        self.executor = BatchedExecutor()
        self.experts = nn.ModuleDict()
        self.stitches = nn.ModuleDict(
            {str(p.after_layer): StitchLayer(p.kind, self.width, [], spec=self.spec)
             for p in self.placement}
        )
        self.output = None
        if self.spec.output == "mixture":
            self.output = OutputStitch(self.width, [], self.spec.output_mix,
                                       self.spec.output_evidence)
        self.depth_maps: dict[str, tuple[int, ...]] = {}  # resolved, for every expert
        _check_mapped_names(self.spec, experts)
        for name, model in experts.items():
            self.add_expert(name, model)
        initialise(self, self.spec.init, self.spec.init_seed)

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
        spec: StitchSpec | None = None,
    ) -> StitchedModel:
        """Stitch loaded causal LMs; `placement` overrides the paper's default of `num_stitches`;
        `spec` (all stitch-layer settings) replaces gate_dropout and gate_gain when given."""
        spec = replace(spec or StitchSpec(gate_dropout=gate_dropout, gate_gain=gate_gain),
                       placement=tuple(placement or ()))
        spec = spec.resolve(hub.config.num_hidden_layers, num_stitches)
        return cls(hub, experts, spec, InferenceOptions(batched=batched))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> StitchedModel:
        """Load a directory written by `save_pretrained` (verifies each constituent's SHA-256)."""
        from bts.stitch_io import load_stitched  # stitch_io does not import this module

        return load_stitched(Path(path), cls)

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

    @property
    def expert_depth(self) -> int:
        """Blocks an expert of the hub's depth runs: the ones after the last experts-into-hub
        stitch cannot matter (unless the output stitch reads the experts' own final states).
        `expert_depths` has each expert's own count."""
        if self.output is not None:
            return self.hub.config.num_hidden_layers
        return max(p.after_layer for p in self.placement if p.kind == EXPERTS_INTO_HUB) + 1

    @property
    def expert_depths(self) -> dict[str, int]:
        """Blocks each expert runs (its own depth with the output stitch, else up to the block
        its last stitch point reads)."""
        return {name: self.block_stops(name)[-1] for name in self.experts}

    def block_stops(self, name: str) -> list[int]:
        """Blocks constituent `name` has run at each stitch point (placement order), then at
        the end: a stitch after hub block l reads expert i after its block depth_maps[i][k]."""
        if name == HUB:
            return [p.after_layer + 1 for p in self.placement] + [self.config.num_hidden_layers]
        stops = [block + 1 for block in self.depth_maps[name]]
        own = self.experts[name].config.num_hidden_layers
        return [*stops, own if self.output is not None else stops[-1]]

    # --- modularity and training --------------------------------------------------------------

    def add_expert(
        self, name: str, model: PreTrainedModel, depth_map: Sequence[int] | None = None
    ) -> None:
        """Stitch in a new frozen expert (of any depth and width, with the hub's vocabulary);
        its fresh stitch parameters leave the output unchanged. `depth_map` overrides the
        spec's map for it, or the same relative depth (bts.spec.depth_map)."""
        _check_name(name, self.expert_names)
        check_compatible(self.hub, adapter(model, f"expert '{name}'").model, name)
        spec = self.spec if depth_map is None else self.spec.with_depth_map(name, depth_map)
        self.depth_maps[name] = _resolved_depth_map(spec, name, self.hub, model)
        self.spec = spec
        self.executor.drop()
        self.experts[name] = freeze(model)
        for stitch in self.stitches.values():
            stitch.add_expert(name, model.config.hidden_size)
        if self.output is not None:  # its gate reads the hub's state: the expert's width is moot
            self.output.add_expert(name)

    def remove_expert(self, name: str) -> None:
        """Drop an expert and its stitch parameters; the gates renormalise over the rest."""
        if name not in self.experts:
            raise BtsError(f"no expert named '{name}': stitched experts are {self.expert_names}")
        self.executor.drop(leaving=self.experts[name])  # it keeps working on its own
        del self.experts[name], self.depth_maps[name]
        self.spec = self.spec.with_depth_map(name, None)
        for stitch in self.stitch_modules():
            stitch.remove_expert(name)

    def stitch_modules(self) -> list[nn.Module]:
        """The stitch layers, then the output stitch if there is one: all that trains."""
        return [*self.stitches.values(), *([self.output] if self.output is not None else [])]

    def stitch_parameters(self, expert: str | None = None) -> Iterator[nn.Parameter]:
        """All stitch parameters, or only those that belong to one expert."""
        for stitch in self.stitch_modules():
            yield from stitch.parameters() if expert is None else stitch.expert_parameters(expert)

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
        for stitch in self.stitch_modules():
            stitch.train(mode)
        self.hub.eval()
        self.experts.eval()
        return self

    def set_inference(self, **changes) -> StitchedModel:
        """Change some of `inference`'s fields (a new InferenceOptions: copies stay apart)."""
        self.inference = replace(self.inference, **changes)
        return self

    @property
    def batched_reason(self) -> str | None:
        """Why forward runs the per-model loop instead of the batched path (None: it is batched)."""
        return self.executor.reason(self)

    # --- forward ------------------------------------------------------------------------------

    def new_cache(self) -> StackedCache | dict[str, DynamicCache]:
        """A KV cache for incremental decoding: one stacked cache when batched, else one per model."""
        if self.executor.stacks(self) is not None:
            return StackedCache()
        models = {HUB: self.hub, **self.experts}
        return {name: DynamicCache(config=m.config) for name, m in models.items()}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
        return_gates: bool = False, logits_to_keep: int = 0, expert_keep: torch.Tensor | None = None,
    ) -> StitchedOutput:
        """Logits (and loss, gates, cache). `expert_keep` [batch, experts] bool prunes experts
        per row (`InferenceOptions.prune_threshold`); one pruned on every row does not run."""
        cache = self.new_cache() if use_cache and past_key_values is None else past_key_values
        names, keep = _kept_experts(self, expert_keep, input_ids)
        stacks = _batched_stacks(self, cache)
        run = self._run_looped if stacks is None else partial(self.executor.run, self, stacks)
        hub, finals, records = run(input_ids, attention_mask, cache, return_gates, names, keep)
        logits, loss = _head(self, hub, finals, names, keep, input_ids, attention_mask, cache,
                             logits_to_keep, labels, records)
        gates = records if return_gates else None
        return StitchedOutput(loss, logits, cache if use_cache else None, gates)

    def _run_looped(self, input_ids, attention_mask, caches, return_gates, names, keep):
        """The reference path (Eq. 3-4): each constituent runs its own blocks up to the one the
        next stitch point reads (`block_stops`), then that stitch layer mixes the streams."""
        caches = caches or {}
        past = caches[HUB].get_seq_length() if caches else 0
        positions = position_ids(input_ids, attention_mask, past)
        models = {HUB: adapter(self.hub, HUB), **{n: adapter(self.experts[n], n) for n in names}}
        streams = {name: dec.embed(input_ids) for name, dec in models.items()}
        contexts = {name: dec.context(streams[name], attention_mask, caches.get(name), positions)
                    for name, dec in models.items()}
        stops = {name: self.block_stops(name) for name in models}
        records, done = [], dict.fromkeys(models, 0)
        recompute = self.training and self.inference.checkpoint_frozen
        for step in range(len(self.placement) + 1):  # each runs its own blocks up to the point
            for name, dec in models.items():
                blocks = range(done[name], stops[name][step])
                streams[name] = _run_blocks(dec, blocks, streams[name], positions, contexts[name],
                                            caches.get(name), recompute)
                done[name] = stops[name][step]
            if step < len(self.placement):
                index = self.placement[step].after_layer
                hub, experts = self.apply_stitch(index, streams, names, keep, return_gates, records)
                streams.update({HUB: hub, **experts})
        return streams[HUB], self.final_streams(streams, names), records

    def apply_stitch(self, index, streams, names, keep, return_gates, records):
        """The stitch after block `index` on the streams; its gates recorded if asked."""
        stitch, dtype = self.stitches[str(index)], streams[HUB].dtype
        # bf16 constituents (`stitch.constituent_dtype`): stitch maths in the stitch's dtype
        work = next(stitch.parameters(), streams[HUB]).dtype
        experts = {n: streams[n].to(work) for n in names}
        hub, experts, gates = stitch(streams[HUB].to(work), experts, names=names, keep=keep)
        if return_gates:
            sources = [HUB, *names] if stitch.kind == EXPERTS_INTO_HUB else list(names)
            records.append(GateRecord(index, stitch.kind, sources, _gate_means(gates)))
        return hub.to(dtype), {n: e.to(dtype) for n, e in experts.items()}

    def final_streams(self, streams, names) -> dict[str, torch.Tensor]:
        """The experts' last states, kept only for the output stitch (which applies their
        heads); without it nothing reads them, and the chunked path would concatenate them."""
        return {n: streams[n] for n in names} if self.output is not None else {}

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Greedy or sampled decoding with KV caches, speculative where it applies
        (bts.generation.generate, which lists the arguments)."""
        return generate(self, input_ids, **kwargs)


def _batched_stacks(model, cache):
    """The stacks when this forward runs batched: with a stacked cache, in eval mode, and in
    train mode only if asked (`InferenceOptions.batched_training`); never with a per-model
    cache, and not for a cache-less eval forward of bf16/fp16 constituents on CPU, where the
    per-model loop measured 1.7x faster (docs/inference.md, "Against the peer")."""
    training = model.training and cache is None and not model.inference.batched_training
    eval_without_cache = cache is None and not model.training
    if isinstance(cache, dict) or training or (eval_without_cache and _low_precision_cpu(model)):
        return None
    stacks = model.executor.stacks(model)
    if isinstance(cache, StackedCache) and stacks is None:
        raise BtsError(
            "this StackedCache belongs to the batched path, which is off or unavailable: "
            "start again with model.new_cache()"
        )
    return stacks


def _low_precision_cpu(model) -> bool:
    """Constituents in bf16/fp16 on CPU: torch's batched matmul then copies its operands, while
    each model's own linear layers use the CPU's bf16 kernels directly."""
    weight = next(model.hub.parameters())
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)


def _head(model, hub, finals, names, keep, input_ids, attention_mask, cache, logits_to_keep,
          labels, records) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, loss) from the final streams: the hub's own head (the paper's), or each
    constituent's own head on its own final state, mixed per token (ours, bts.heads)."""
    if model.output is None:
        logits = adapter(model.hub, HUB).logits(hub[:, -logits_to_keep:])
        return logits, causal_lm_loss(logits, labels) if labels is not None else None
    logits, weights, loss = mixed_output(
        model.output, {HUB: model.hub, **model.experts}, {HUB: hub, **finals}, names, keep,
        input_ids, attention_mask, cache, logits_to_keep, labels, model.training,
    )
    layers = model.config.num_hidden_layers
    records.append(GateRecord(layers, OUTPUT, [HUB, *names], weights.detach()))
    return logits, loss


def _run_blocks(dec, blocks: range, hidden, positions, context, cache, recompute=False):
    """Blocks `blocks` of one constituent (through its adapter) on `hidden`, in order."""
    for index in blocks:
        hidden = _block(dec, recompute, index, hidden, positions, context, cache)
    return hidden


def _gate_means(gates) -> torch.Tensor:
    """[..., sources]: each source's gate averaged over its dimensions (a tensor [..., sources,
    d_0], or one [..., d_i] per expert for hub-into-experts, whose widths may differ)."""
    if isinstance(gates, torch.Tensor):
        return gates.detach().mean(dim=-1)
    return torch.stack([g.detach().mean(dim=-1) for g in gates], dim=-1)


def _check_mapped_names(spec: StitchSpec, experts: dict) -> None:
    unknown = [name for name in spec.depth_maps if name not in experts]
    if unknown:
        raise BtsError(
            f"StitchSpec.depth_maps names '{unknown[0]}', which is not among the experts "
            f"{list(experts)}: remove its map, or stitch it with add_expert(name, model, depth_map)"
        )


def _resolved_depth_map(spec: StitchSpec, name: str, hub, expert) -> tuple[int, ...]:
    """Expert `name`'s block at each stitch point: the spec's explicit map, else the same
    relative depth; refused (one line with the fix) unless strictly increasing and in range."""
    hub_layers, layers = hub.config.num_hidden_layers, expert.config.num_hidden_layers
    blocks = spec.depth_maps.get(name) or depth_map(spec.placement, hub_layers, layers)
    check_depth_map(name, blocks, spec.placement, hub_layers, layers)
    return tuple(blocks)


def _active_experts(
    names: list[str], expert_keep: torch.Tensor | None, rows: int
) -> tuple[list[str], torch.Tensor | None]:
    """Experts that run (kept on some row) and the per-row 0/1 keep of those, None if all."""
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


def _kept_experts(model, expert_keep, input_ids) -> tuple[list[str], torch.Tensor | None]:
    """`_active_experts`, or in training with `spec.expert_dropout` p: every expert runs (so each
    rank of a distributed run uses the same modules) and each row closes each one with
    probability p, as a removal closes it (prior 0 in every softmax; the rest renormalise).
    Drawn from torch's generator, like gate dropout: a resumed run draws what an uninterrupted
    one would."""
    rate, names = model.spec.expert_dropout, model.expert_names
    if expert_keep is not None or not model.training or not rate:
        return _active_experts(names, expert_keep, input_ids.shape[0])
    draw = torch.rand(input_ids.shape[0], len(names), device=input_ids.device)
    return names, draw >= rate


def _block(dec, recompute: bool, *args) -> torch.Tensor:
    """A constituent's block; with `recompute` its activations are recomputed in the backward
    pass instead of kept (frozen weights and no dropout: the same loss and gradients)."""
    if recompute:
        return checkpoint(dec.block, *args, use_reentrant=False)
    return dec.block(*args)
