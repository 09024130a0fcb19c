"""The baselines' typed config sections (`baselines:` in a run's YAML), and nothing else.

Only pydantic and the standard library: `bts.config` parses every spec without importing
mergekit or the Mixtral classes, which load only when a run builds or loads that baseline
(`bts.baselines.registry`). Each baseline module re-exports its own spec.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ----- weight merges (bts.baselines.merges)

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_ties"]
SPARSE_METHODS = ("ties", "dare_ties")
EXPERTS_ONLY_SOUP = "linear_experts"  # the system name of a soup without the seed


class MergeSpec(BaseModel):
    """One merge baseline. YAML may spell `lambda_` as `lambda`."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    method: MergeMethod
    weight: float = 1.0  # every expert's weight, and the seed's in the soup (all symmetric here)
    # fraction of each delta kept (ties, dare_ties; None = 0.5 for those)
    density: float | None = Field(None, gt=0.0, le=1.0)
    lambda_: float | None = Field(None, alias="lambda")  # scale of the merged delta; None = 1
    normalize: bool = True  # divide by the sum of (participating) weights
    random_seed: int = 0  # DARE's random drops
    # linear only: the seed is one more ingredient of the soup, weighted like an expert (the BTS
    # paper's soup); False averages the experts alone. Task-vector methods always build on it.
    include_seed: bool = True

    @model_validator(mode="after")
    def _only_parameters_the_method_uses(self) -> MergeSpec:
        if self.method not in SPARSE_METHODS and self.density is not None:
            raise ValueError(
                f"density applies to {' and '.join(SPARSE_METHODS)}, not {self.method}"
            )
        if self.method == "linear" and self.lambda_ is not None:
            raise ValueError("lambda applies to task-vector methods, not linear")
        if self.method != "linear" and not self.include_seed:
            raise ValueError(
                f"include_seed=false applies to linear, not {self.method} (whose base is the seed)"
            )
        return self

    @property
    def name(self) -> str:
        """The system's name (its RUN/baselines/ directory and report row): the method, but
        `linear_experts` for the experts-only soup, so both soups can sit in one run."""
        return self.method if self.include_seed else EXPERTS_ONLY_SOUP


# Defaults: soup = plain mean of the seed and the experts; task arithmetic adds half the summed
# expert deltas (Ilharco et al. tune lambda on validation data, 0.3-0.5 being typical for several
# tasks); TIES keeps half of each delta (dense enough for continued-pretraining deltas) with the
# disjoint mean; DARE-TIES drops half at random, rescales, then merges like TIES.
DEFAULT_MERGES: list[MergeSpec] = [
    MergeSpec(method="linear"),
    MergeSpec(method="task_arithmetic", lambda_=0.5, normalize=False),
    MergeSpec(method="ties", density=0.5),
    MergeSpec(method="dare_ties", density=0.5),
]

# ----- Branch-Train-MiX (bts.baselines.btx)

Routing = Literal["top2", "soft", "top1"]


class BTXSpec(BaseModel, extra="forbid"):
    """How to build (and, for the training loop, what to train in) the BTX model."""

    routing: Routing = "top2"  # BTX: top-k (k = num_experts_per_tok) with load balancing
    num_experts_per_tok: int = Field(2, ge=1)  # top2 only; top1 uses 1, soft all experts
    gumbel_temperature: float = Field(1.0, gt=0.0)  # top1 only: Gumbel-softmax temperature
    include_seed: bool = True  # the seed's FFN joins as a generalist expert (BTX main setup)
    train_all: bool = True  # BTX fine-tunes every weight; False trains the routers only
    aux_loss_coef: float = Field(0.01, ge=0.0)  # BTX: load-balancing alpha = 0.01 (not soft)
    router_init_std: float = Field(0.02, ge=0.0)  # Mixtral's init; 0 gives all-zero routers
    router_seed: int = 0

    @model_validator(mode="after")
    def _k_only_for_top2(self):
        # 2 is accepted whatever the routing, so dumped specs and configs reload unchanged
        if self.routing != "top2" and self.num_experts_per_tok != 2:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} applies to routing='top2' only, "
                f"not {self.routing!r}: drop it"
            )
        return self


# ----- expert routing (bts.baselines.routing)


class RoutingSpec(BaseModel, extra="forbid"):
    """Prefix lengths (tokens) the router reads in training and in evaluation."""

    min_prefix: int = Field(32, ge=1)
    max_prefix: int = Field(256, ge=1)
    eval_prefix: int = Field(32, ge=1)
    seed: int = 0  # seeds the per-batch prefix draw
    # causal: the prediction at position t comes from the model routed on the tokens up to t
    # (at most the first eval_prefix). False routes each row once on its first eval_prefix
    # tokens and scores them too, having read them (docs/baselines.md: not a causal LM)
    causal: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> RoutingSpec:
        if self.min_prefix > self.max_prefix:
            raise ValueError(f"min_prefix={self.min_prefix} exceeds max_prefix={self.max_prefix}")
        return self


# ----- Branch-Attend-Mix (bts.baselines.bam)


class BAMSpec(BaseModel, extra="forbid"):
    """How to build (and, for the training loop, what to train in) the BAM model."""

    # soft: every FFN expert, softmax-weighted, as the BTS paper runs BAM; top2 and top1 are the
    # BTX variants (top-k, or sampled top-1, with load balancing)
    ffn_routing: Routing = "soft"
    num_experts_per_tok: int = Field(2, ge=1)  # top2 only; top1 uses 1, soft all experts
    gumbel_temperature: float = Field(1.0, gt=0.0)  # top1 only
    include_seed: bool = True  # the seed joins as a generalist expert (attention and FFN)
    train_all: bool = True  # BAM trains every weight; False the routers (and adapters) only
    # BAM with adapters (BTS paper Sec. 3.3): a d x d output adapter on every attention and FFN
    # expert, trained with the routers while every constituent stays frozen (needs train_all off)
    adapters: bool = False
    aux_loss_coef: float = Field(0.01, ge=0.0)  # load balancing of the FFN routers (not soft)
    router_init_std: float = Field(0.02, ge=0.0)  # FFN and attention routers
    router_seed: int = 0

    @model_validator(mode="after")
    def _k_only_for_top2(self):
        # 2 is accepted whatever the routing, so dumped specs and configs reload unchanged
        if self.ffn_routing != "top2" and self.num_experts_per_tok != 2:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} applies to ffn_routing='top2' "
                f"only, not {self.ffn_routing!r}: drop it"
            )
        return self

    @model_validator(mode="after")
    def _adapters_keep_the_constituents_frozen(self):
        if self.adapters and self.train_all:
            raise ValueError(
                "adapters: true trains only the routers and adapters, the constituents stay "
                "frozen: set train_all: false"
            )
        return self
