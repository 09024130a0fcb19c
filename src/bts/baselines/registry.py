"""Every baseline, by name: its config keys, its systems, its report rows, and where its code is.

An entry (`Baseline`) is light: names, config fields and small functions of the config. What
builds, trains, saves and loads its models is the `HOOKS` of its module, imported only when a
run needs them, so that parsing a config or rendering a report imports no mergekit and no
Mixtral classes. `bts.config` (`BaselinesConfig`), `bts.stages` (`baselines`, `Run.outputs`),
`bts.compare` and `bts.report` iterate over `BASELINES` and name no baseline themselves.

Adding a baseline: its spec in `specs.py`, its module (the model code and a `HOOKS`), its
entry below, and its tests (docs/baselines.md, "Adding a baseline").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field

from bts.baselines.specs import (
    DEFAULT_MERGES,
    EXPERTS_ONLY_SOUP,
    BAMSpec,
    BTXSpec,
    MergeMethod,
    MergeSpec,
    RoutingSpec,
)

# A config key holding a baseline's own training schedule (a TrainConfig, or null for the
# stitch stage's schedule at the baseline's learning rate); bts.config gives it its type,
# which would import torch here.
SCHEDULE = "schedule"

# Each trained baseline's default learning rate (its schedule is the stitch stage's, so the
# same tokens), chosen on the demo's validation rows: benchmarks/sweeps/baselines-lr.yaml and
# docs/results.md. BTX and BAM fine-tune every weight, so their rate is far below the stitch
# layers'; the router of expert routing reads RMS-normalised embeddings and needs a high one.
# BAM with adapters trains its routers and adapters only, over frozen constituents.
BASELINE_LR = {"btx": 1e-4, "bam": 1e-4, "bam_adapters": 1e-3, "expert_routing": 1e-2}


def _nothing_trained(model, spec) -> None:
    model.requires_grad_(False)


@dataclass(frozen=True)
class Hooks:
    """What builds and loads one baseline's models: the `HOOKS` of its module.

    A baseline is one of three kinds. Trained: `build` gives the model, `trainable` marks what
    trains, the pipeline trains it on the stitch stage's mix and tokens, then `save` writes it
    (default: `save_pretrained` with the tokenizer and the stage marker). Written: `write`
    builds its directory with no training (a merge) and returns the stage marker's fields.
    Assembled: nothing is built, `assemble` makes it from the seed and experts (BTM).
    """

    build: Callable[[Any, Path, Mapping[str, Path]], Any] | None = None
    save: Callable[[Any, Path], None] | None = None
    write: Callable[[Any, Path, Mapping[str, Path], Path], dict] | None = None
    load: Callable[[Path], Any] | None = None  # from its directory
    assemble: Callable[[Path, Mapping[str, Path]], Any] | None = None
    # what its own stage trains (params_trained in the report, and what the pipeline trains)
    trainable: Callable[[Any, Any], None] = _nothing_trained
    # the file a complete directory holds, if not the stage marker (bts_stage.json)
    manifest: str | None = None


@dataclass(frozen=True)
class Baseline:
    """One baseline as the config, the pipeline and the report see it (no model code)."""

    module: str  # its implementation, where `HOOKS` is
    # its keys in the `baselines:` section, in YAML order: name -> (type, default) or SCHEDULE
    fields: dict[str, Any]
    # the systems a config enables: name (directory, training stage, report row) -> (its spec,
    # its own schedule or None)
    systems: Callable[[Any], dict[str, tuple[Any, Any]]]
    names: tuple[str, ...]  # every system name it can give
    rows: tuple[str, ...]  # its report rows in order (aliases included)
    place: int  # where its rows come among the baselines' in the report
    single_model: tuple[str, ...] = ()  # systems that are one model to deploy
    whole_experts: tuple[str, ...] = ()  # systems that keep every expert whole (vs bts_heads)
    kind: Literal["model", "routing"] | None = "model"  # its directories' kind; None: none
    lr: Callable[[Any], float | None] = lambda spec: None  # None: the stitch stage's rate
    aliases: Callable[[Any], dict[str, str]] = lambda config: {}  # extra row -> system
    check: Callable[[Any], None] | None = None  # a check across its keys (raises ValueError)
    # its weights line up with the seed's tensor by tensor: every expert in the seed's shape
    one_shape: bool = False

    @property
    def hooks(self) -> Hooks:
        return importlib.import_module(self.module).HOOKS


@dataclass(frozen=True)
class System:
    """One system of a run that a baseline gives: `name` is its RUN/baselines/ directory, its
    training stage (RUN/train/<name>) and its report row."""

    name: str
    baseline: Baseline
    spec: Any
    schedule: Any = None  # its own TrainConfig; None: the stitch stage's at `lr`

    @property
    def hooks(self) -> Hooks:
        return self.baseline.hooks

    @property
    def lr(self) -> float | None:
        return self.baseline.lr(self.spec)


# ----- the entries


def _btx_systems(config) -> dict[str, tuple[Any, Any]]:
    if config.btx is None:
        return {}
    return {
        f"btx_{routing}": (config.btx.model_copy(update={"routing": routing}), config.btx_train)
        for routing in config.btx_variants
    }


def _bam_systems(config) -> dict[str, tuple[Any, Any]]:
    """BAM, and BAM with adapters (frozen constituents), each with its own schedule key."""
    return {
        name: (getattr(config, name), getattr(config, f"{name}_train"))
        for name in ("bam", "bam_adapters")
        if getattr(config, name) is not None
    }


def _bam_adapters_has_adapters(config) -> None:
    if config.bam_adapters is not None and not config.bam_adapters.adapters:
        raise ValueError("bam_adapters needs adapters: true (plain BAM is `bam`)")


MERGES = get_args(MergeMethod)
BTXVariant = Literal["soft", "top1", "top2"]  # the report's order
BTX_VARIANTS = get_args(BTXVariant)
BTX_SYSTEMS = tuple(f"btx_{variant}" for variant in BTX_VARIANTS)

# In YAML order; `place` orders the report: merges, then the paper's Table 3 order.
BASELINES: tuple[Baseline, ...] = (
    Baseline(
        module="bts.baselines.merges",
        fields={"merges": (list[MergeSpec], Field(default_factory=lambda: list(DEFAULT_MERGES)))},
        systems=lambda config: {merge.name: (merge, None) for merge in config.merges},
        names=(*MERGES, EXPERTS_ONLY_SOUP),
        rows=MERGES,  # the experts-only soup sorts with the systems the report does not know
        place=0,
        single_model=(*MERGES, "soup", EXPERTS_ONLY_SOUP),  # `soup`: as the report always had it
        one_shape=True,
    ),
    Baseline(
        module="bts.baselines.btx",
        fields={
            "btx": (BTXSpec | None, BTXSpec()),  # its routing is the default variant, `btx`
            "btx_variants": (list[BTXVariant], list(BTX_VARIANTS)),
            # default: the stitch stage's schedule (same tokens) at lr 1e-4 (BASELINE_LR)
            "btx_train": SCHEDULE,
        },
        systems=_btx_systems,
        names=BTX_SYSTEMS,
        rows=(*BTX_SYSTEMS, "btx"),
        place=3,
        single_model=BTX_SYSTEMS,
        one_shape=True,
        lr=lambda spec: BASELINE_LR["btx"] if spec.train_all else None,  # routers only: stitch's
        aliases=lambda config: {} if config.btx is None else {"btx": f"btx_{config.btx.routing}"},
    ),
    Baseline(
        module="bts.baselines.btm",
        fields={"btm": (bool, True)},  # output ensemble, nothing to train
        systems=lambda config: {"btm": (None, None)} if config.btm else {},
        names=("btm",),
        rows=("btm",),
        place=1,
        whole_experts=("btm",),
        kind=None,
    ),
    Baseline(
        module="bts.baselines.routing",
        fields={
            "expert_routing": (RoutingSpec | None, RoutingSpec()),
            # default: the stitch schedule at lr 1e-2 (the router reads RMS-normalised embeddings)
            "routing_train": SCHEDULE,
        },
        systems=lambda config: (
            {}
            if config.expert_routing is None
            else {"expert_routing": (config.expert_routing, config.routing_train)}
        ),
        names=("expert_routing",),
        rows=("expert_routing",),
        place=2,
        whole_experts=("expert_routing",),
        kind="routing",
        lr=lambda spec: BASELINE_LR["expert_routing"],
    ),
    Baseline(
        module="bts.baselines.bam",
        fields={
            "bam": (BAMSpec | None, BAMSpec()),
            # BAM with adapters (the paper's Sec. 3.3): adapters: true, train_all: false
            "bam_adapters": (BAMSpec | None, None),
            "bam_train": SCHEDULE,  # default: the stitch stage's schedule at lr 1e-4
            "bam_adapters_train": SCHEDULE,  # default: the stitch schedule at lr 1e-3
        },
        systems=_bam_systems,
        names=("bam", "bam_adapters"),
        rows=("bam", "bam_adapters"),
        place=4,
        single_model=("bam", "bam_adapters"),
        one_shape=True,
        lr=lambda spec: BASELINE_LR["bam" if spec.train_all else "bam_adapters"],
        check=_bam_adapters_has_adapters,
    ),
)

# ----- what the rest of bts reads

# every baseline row of the report, in its order
REPORT_ROWS = tuple(row for b in sorted(BASELINES, key=lambda b: b.place) for row in b.rows)
SINGLE_MODEL = tuple(name for b in BASELINES for name in b.single_model)
WHOLE_EXPERTS = tuple(
    name for name in REPORT_ROWS if any(name in b.whole_experts for b in BASELINES)
)


def config_fields() -> dict[str, Any]:
    """Every baseline's config keys, in YAML order (bts.config builds BaselinesConfig)."""
    return {key: value for b in BASELINES for key, value in b.fields.items()}


def check(config) -> None:
    """The checks across one baseline's keys (BaselinesConfig's validator)."""
    for baseline in BASELINES:
        if baseline.check is not None:
            baseline.check(config)


def enabled_systems(config) -> list[System]:
    """Every system the `baselines` config section enables, baseline by baseline."""
    return [
        System(name, baseline, spec, schedule)
        for baseline in BASELINES
        for name, (spec, schedule) in baseline.systems(config).items()
    ]


def find_system(config, name: str) -> System | None:
    """The system called `name` in this config, if a baseline gives it."""
    return next((s for s in enabled_systems(config) if s.name == name), None)


def owner(name: str) -> Baseline | None:
    """The baseline whose systems can be called `name`, whatever the config."""
    return next((b for b in BASELINES if name in b.names), None)


def outputs(config) -> dict[str, str]:
    """name -> kind of every directory the enabled baselines write (RUN/baselines/<name>)."""
    return {s.name: s.baseline.kind for s in enabled_systems(config) if s.baseline.kind}


def aliases(config) -> dict[str, str]:
    """Report rows that repeat another system's (`btx`: the config's default BTX variant)."""
    return {alias: name for b in BASELINES for alias, name in b.aliases(config).items()}
