"""What a stitched model is made of, as data: `StitchSpec` (placement, gate options, init).

One frozen dataclass travels everywhere a stitched model is described: `StitchedModel` holds it,
the manifest (`bts.stitch_io`) and the export config (`bts.hf`) serialise its fields by name, and
the pipeline builds it from `StitchConfig`. The module imports no torch, so config parsing and
manifest checks stay light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from bts.errors import BtsError

StitchKind = Literal["experts_into_hub", "hub_into_experts"]
EXPERTS_INTO_HUB: StitchKind = "experts_into_hub"
HUB_INTO_EXPERTS: StitchKind = "hub_into_experts"
GateInput = Literal["rms", "raw"]
ExpertStream = Literal["keep", "project"]
OutputKind = Literal["hub", "mixture"]
OutputMix = Literal["prob", "log"]
# identity: exactly the hub at step 0 (ours); uniform: an even blend of hub and experts
# (MixtureKit's start); uniform_into_hub: blended experts-into-hub stitches only (the default the
# pipeline chose on validation); random: nn.Linear's init with a = 1 (the paper's)
Init = Literal["identity", "uniform", "uniform_into_hub", "random"]

# the choices of every enumerated field: validation here, in the manifest and in the export
CHOICES = {
    "gate_input": ("rms", "raw"),
    "gate_bias": (True, False),
    "expert_stream": ("keep", "project"),
    "output": ("hub", "mixture"),
    "output_mix": ("prob", "log"),
    "output_evidence": (True, False),
    "init": ("identity", "uniform", "uniform_into_hub", "random"),
}


@dataclass(frozen=True)
class StitchPoint:
    """A stitch layer applied to the hidden states after block `after_layer` (0-based)."""

    after_layer: int
    kind: StitchKind


@dataclass(frozen=True)
class StitchSpec:
    """How a stitched model's stitch layers sit and compute (docs/stitching.md, "Options").

    - placement: the stitch points; empty means the paper's default of four over the hub's
      depth (`resolve` fills it in once the depth is known);
    - gate_input: gates read the RMS-normalised hub state ("rms", ours) or the raw one ("raw",
      Eq. 3-4 as written);
    - gate_bias: gate linears have a bias (ours) or not (the paper's pseudo-code);
    - expert_stream: after an experts-into-hub stitch each expert's next block reads its own
      h_i ("keep", ours) or W_proj_i(h_i) ("project", Eq. 3 and the appendix pseudo-code);
    - output: the hub's head ("hub", the paper's) or a gated mixture of the hub's and the
      experts' own heads ("mixture", bts.heads), mixed in probability or log space;
    - init: how fresh stitch parameters start (see `Init`); loading saved weights overrides it;
    - expert_dropout: in training, each expert is closed on each row with this probability
      (as if removed), so the stitch learns to do without it (docs/stitching.md);
    - depth_maps: per expert, the block (0-based) it is read after at each stitch point, in
      placement order; an expert left out follows `depth_map` (the same relative depth).
    """

    placement: tuple[StitchPoint, ...] = ()
    gate_dropout: float = 0.1
    gate_gain: float = 1.0
    gate_input: GateInput = "rms"
    gate_bias: bool = True
    expert_stream: ExpertStream = "keep"
    output: OutputKind = "hub"
    output_mix: OutputMix = "prob"
    output_evidence: bool = True
    init: Init = "identity"
    init_seed: int = 0  # seeds the random init (recorded: how the trained weights started)
    expert_dropout: float = 0.0  # training only, like gate_dropout
    # a dict (left out of the hash, which the other fields still give)
    depth_maps: Mapping[str, tuple[int, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        points = tuple(
            p if isinstance(p, StitchPoint) else StitchPoint(int(p[0]), p[1])
            for p in self.placement
        )
        object.__setattr__(self, "placement", tuple(sorted(points, key=lambda p: p.after_layer)))
        maps = {str(name): tuple(blocks) for name, blocks in (self.depth_maps or {}).items()}
        object.__setattr__(self, "depth_maps", maps)
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                names = " or ".join(repr(c) for c in choices)
                raise BtsError(f"{key} '{getattr(self, key)}' is unknown: use {names}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise BtsError(f"expert_dropout {self.expert_dropout} is out of range: use [0, 1)")

    def resolve(self, num_layers: int, num_stitches: int = 4) -> StitchSpec:
        """This spec with its placement filled in for a hub of `num_layers`, and checked."""
        placement = self.placement or tuple(default_placement(num_layers, num_stitches))
        check_placement(placement, num_layers)
        return replace(self, placement=placement)

    def options(self) -> dict:
        """Every field but the placement, by name: what a manifest and an export config record
        beside it (JSON values)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "placement"}
        return values | {"depth_maps": {n: list(m) for n, m in self.depth_maps.items()}}

    def with_depth_map(self, name: str, blocks: Sequence[int] | None) -> StitchSpec:
        """This spec with expert `name`'s explicit depth map set (None: removed)."""
        maps = {n: m for n, m in self.depth_maps.items() if n != name}
        return replace(self, depth_maps=maps | ({} if blocks is None else {name: tuple(blocks)}))


# The paper's layer as written (Sec. 2.3, Eq. 3-4, Appendix B): raw hub state into the gates, no
# gate bias, projected expert streams, nn.Linear init with a = 1.
PAPER_SPEC = StitchSpec(gate_input="raw", gate_bias=False, expert_stream="project", init="random")


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


def depth_map(placement: Sequence[StitchPoint], hub_layers: int, expert_layers: int) -> list[int]:
    """The expert block read at each stitch point, at the same relative depth: after hub block l
    (of L0) comes expert block m(l) = max(1, round((l + 1) * Li / L0)) - 1, halves rounded up
    (integer arithmetic, so no float decides a tie). The identity when Li = L0; the hub's last
    block always maps to the expert's last."""
    return [
        max(1, (2 * (p.after_layer + 1) * expert_layers + hub_layers) // (2 * hub_layers)) - 1
        for p in placement
    ]


def check_depth_map(
    name: str, blocks: Sequence[int], placement: Sequence[StitchPoint], hub_layers: int,
    expert_layers: int,
) -> None:
    """One block per stitch point, each in the expert's range, strictly increasing: between two
    stitch points every constituent runs at least one block of its own."""
    afters = [p.after_layer for p in placement]
    fix = (
        f"use fewer stitch points (num_stitches) or give StitchSpec.depth_maps['{name}'] "
        f"{len(afters)} strictly increasing blocks in 0..{expert_layers - 1}"
    )
    if len(blocks) != len(afters) or not all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < expert_layers for b in blocks
    ):
        raise BtsError(
            f"expert '{name}' has depth map {list(blocks)} for stitch points after hub blocks "
            f"{afters}: {fix}"
        )
    for k in range(1, len(blocks)):
        if blocks[k] <= blocks[k - 1]:
            lead = (
                f"expert '{name}' has layers {expert_layers} but the hub has {hub_layers}"
                if expert_layers != hub_layers else f"expert '{name}' has an explicit depth map"
            )
            raise BtsError(
                f"{lead}: the stitch points after hub blocks {afters[k - 1]} and {afters[k]} "
                f"would read its blocks {blocks[k - 1]} and {blocks[k]} (depth map "
                f"{list(blocks)}); {fix}"
            )
