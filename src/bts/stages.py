"""The pipeline's stages: seed, branch, train-expert, stitch, add/remove expert, baselines.

Each stage is a thin recipe over the components (data, models, stitch, the one training loop).
A run directory holds each stage's output; an output directory only appears once complete (it
is written under a temporary name and renamed), so a re-run skips every stage whose output is
there and continues an interrupted stage from its training checkpoint in `RUN/train/<stage>`.

    RUN/config.yaml        resolved config            RUN/tokenizer/       tokenizer (tiny seed)
    RUN/seed/              seed model (+tokenizer)    RUN/branches/<d>/    copies of the seed
    RUN/experts/<d>/       trained experts            RUN/stitched/        stitch weights+manifest
    RUN/baselines/<name>/  merges and BTX             RUN/train/<stage>/   checkpoints, metrics, tb
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from bts import pretrained
from bts.arch import adapter, mismatch
from bts.baselines import registry
from bts.config import MixConfig, RunConfig, StitchConfig, dump_config
from bts.data.domains import BUILTIN_DOMAINS, load_domain, train_texts
from bts.data.mixes import MixSampler, mix_weights
from bts.data.packing import DomainData, build_corpus
from bts.data.tokenizer import load_tokenizer, train_tokenizer
from bts.errors import BtsError
from bts.fileio import (
    STITCH_MANIFEST,
    atomic_dir,
    check_replaceable,
    check_target,
    lock_run,
    write_json,
    write_text,
)
from bts.models import HUB, MANIFEST_DTYPES, freeze_output_space, load_causal_lm
from bts.stitch import StitchedModel
from bts.stitch_io import stitched_inputs
from bts.train import RESULT, TrainConfig, TrainResult, train

log = logging.getLogger(__name__)
STAGE_MARKER = "bts_stage.json"
STAGE_OUTPUTS = ("tokenizer", "seed", "branches", "experts", "stitched", "baselines", "train")


def once(fn: Callable, *args, **kwargs) -> None:
    """Under a multi-process launch only the main process writes an output; the others wait."""
    state = PartialState()
    if state.is_main_process:
        fn(*args, **kwargs)
    state.wait_for_everyone()


def is_complete(path: Path) -> bool:
    return (path / STAGE_MARKER).is_file()


def _mark(directory: Path, stage: str, **info) -> None:
    (directory / STAGE_MARKER).write_text(json.dumps({"stage": stage, **info}, indent=2) + "\n")


@dataclass
class Run:
    """A run directory and its config; data and tokenizer are built lazily, once.

    A run with `shared` (a repeat at another training seed, `bts.repeat`) reads the seed,
    branches, experts, tokenizer, data cache and data record of the run at `shared`.
    """

    config: RunConfig
    root: Path
    shared: Path | None = None

    @classmethod
    def open(cls, config: RunConfig, root: Path) -> Run:
        """Create or reopen a run directory, holding its lock; refuse one that holds a different
        config, or a folder that is not a run. Nothing is written before `preflight` passes."""
        root = Path(root)
        saved = root / "config.yaml"
        if root.exists() and not root.is_dir():
            raise BtsError(f"--out {root} is a file: give a directory for the run")
        if root.is_dir() and any(root.iterdir()) and not saved.is_file():
            raise BtsError(
                f"{root} is not empty and is not a bts run directory (no config.yaml): choose a "
                "new or empty --out directory"
            )
        _check_run_root(root, _inputs(config))
        preflight(config)
        lock_run(root)
        # compared parsed, so a run made before a new option (with its default) still reopens
        if saved.is_file() and _saved_config(saved) != config:
            if any(root.joinpath(part).exists() for part in STAGE_OUTPUTS):
                raise BtsError(
                    f"{root} holds a run with a different config ({saved}): use another --out "
                    "directory, or delete that one to start over"
                )
            saved.unlink()  # a run that produced nothing yet takes the corrected config
        run = cls(config, root)
        for path, kind in run.outputs().items():  # before any training, not after it
            check_target(path, run.inputs)
            check_replaceable(path, kind, force=None)
        if not saved.is_file():
            write_text(saved, dump_config(config))
        return run

    @classmethod
    def load(cls, root: Path, lock: bool = True) -> Run:
        """An existing run directory; `lock=False` only for readers that write nothing there."""
        saved = Path(root) / "config.yaml"
        if not saved.is_file():
            raise BtsError(f"{root} is not a run directory (no config.yaml): run `bts run` first")
        run = cls(_saved_config(saved), Path(root))
        if lock:
            lock_run(run.root)
        return run

    def outputs(self) -> dict[Path, str]:
        """Every directory the config's stages write, with the kind of bts output it is."""
        config = self.config
        baselines = {s.name: s.baseline.kind for s in baseline_systems(config) if s.baseline.kind}
        names = ["seed", *(f"branches/{d}" for d in config.expert_domains)]
        names += [f"experts/{d}" for d in config.expert_names]
        names += [f"baselines/{n}" for n, kind in baselines.items() if kind == "model"]
        out = {self.path(n): "model" for n in names}
        out[self.path("tokenizer")] = "tokenizer"
        out[self.path("stitched")] = "stitched"
        if config.bts_heads is not None:
            out[self.path(HEADS_DIR)] = "stitched"
        out |= {self.path("baselines", n): k for n, k in baselines.items() if k != "model"}
        return out

    @property
    def inputs(self) -> dict[str, Path]:
        """What the run reads from outside: user data and a pretrained seed (never written)."""
        return _inputs(self.config)

    def path(self, *parts: str) -> Path:
        if self.shared is not None and parts and parts[0] in SHARED_PARTS:
            return self.shared.joinpath(*parts)
        return self.root.joinpath(*parts)

    @property
    def cache_dir(self) -> Path:
        return self.config.data.cache_dir or self.path("cache")

    @cached_property
    def tokenizer(self):
        if self.config.seed_model.kind == "tiny":
            return make_tokenizer(self)
        return AutoTokenizer.from_pretrained(make_seed(self))

    @cached_property
    def corpus(self) -> dict[str, DomainData]:
        data = self.config.data
        corpus = build_corpus(
            data.sources,
            self.tokenizer,
            data.seq_len,
            self.cache_dir,
            self.config.seed,
            data.held_out_fraction,
            data.text_field,
        )
        check_data(self.path(DATA_RECORD), corpus)
        return corpus

    def sampler(
        self, domains: list[str], mix: MixConfig, batch_size: int, budget_tokens: int
    ) -> MixSampler:
        counts = {d: self.corpus[d].train.n_tokens for d in domains}
        weights = mix_weights(mix.kind, counts, mix.weights, budget_tokens, mix.max_epochs)
        return MixSampler(
            {d: self.corpus[d].train for d in domains}, weights, batch_size, self.config.seed
        )

    def train(self, stage: str, model, sampler: MixSampler, cfg: TrainConfig) -> TrainResult:
        return train(model, sampler.batch, cfg, self.path("train", stage), name=stage)

    def train_result(self, stage: str) -> TrainResult | None:
        path = self.path("train", stage, RESULT)
        return TrainResult.model_validate_json(path.read_text()) if path.is_file() else None


DATA_RECORD = "data.json"
# what a repeat shares with its run: everything before the stitch stage, and the data
SHARED_PARTS = ("seed", "branches", "experts", "tokenizer", "cache", DATA_RECORD)


def check_data(record: Path, corpus: dict[str, DomainData]) -> None:
    """Record each domain's content hash on first use; refuse a run whose data changed since,
    because its finished stages were trained and its report scored on other documents."""
    found = {name: data.fingerprint() for name, data in corpus.items()}
    if record.is_file():
        saved = json.loads(record.read_text())
        for name, now in found.items():
            before = saved.get(name, {}).get("sha256")
            if before is not None and before != now["sha256"]:
                raise BtsError(
                    f"the data of domain '{name}' changed since this run began (content "
                    f"sha256 {before[:12]} -> {now['sha256'][:12]}, {now['source']}): restore "
                    "it, or start a new run with another --out"
                )
        if all(name in saved for name in found):
            return
    once(write_json, record, found)


def _saved_config(path: Path) -> RunConfig:
    from bts.config import load_config

    return load_config(path)


def _inputs(config: RunConfig) -> dict[str, Path]:
    inputs = {
        f"the data of domain '{name}'": Path(source).expanduser()
        for name, source in config.data.sources.items()
        if source not in BUILTIN_DOMAINS
    }
    seed = config.seed_model
    if seed.kind == "pretrained" and seed.path is not None:
        inputs["the pretrained seed"] = Path(seed.path).expanduser()
    for name, source in config.experts.pretrained.items():
        if not str(source).startswith(pretrained.PACKAGE):
            inputs[f"pretrained expert '{name}'"] = Path(source).expanduser()
    return inputs


def _check_run_root(root: Path, inputs: dict[str, Path]) -> None:
    """A run may sit beside its inputs, never inside them (the run's files would join them)."""
    resolved = root.resolve()
    for role, path in inputs.items():
        path = path.resolve()
        if resolved == path or resolved.is_relative_to(path):
            raise BtsError(
                f"run directory {root} lies inside {role} ({path}): choose another --out"
            )


# --- validation before any work --------------------------------------------------------------


def preflight(config: RunConfig) -> None:
    """Every check that needs more than the config itself, before anything is built or written:
    the seed's depth and positions (read from its config, no weights) against the stitch
    placement and `data.seq_len`, and every user domain's text."""
    layers, positions = seed_shape(config.seed_model, config.data.seq_len)
    config.stitch.spec(layers)  # the placement resolves and checks for this depth
    if positions is not None and config.data.seq_len > positions:
        raise BtsError(
            f"data.seq_len {config.data.seq_len} is longer than the seed's "
            f"{positions} positions: lower data.seq_len, or raise "
            "seed_model.max_position_embeddings if the model was trained for longer contexts"
        )
    for name, source in config.data.sources.items():
        if source not in BUILTIN_DOMAINS:
            load_domain(source, config.data.text_field, name)  # one line if unreadable or empty
    if config.experts.pretrained:
        check_pretrained_experts(config)


def check_pretrained_experts(config: RunConfig, seed_tokenizer=None) -> None:
    """Each pretrained expert against the seed (bts.pretrained.check_expert). A tiny seed's
    tokenizer is trained by the run, so before it exists only the rest is checked."""
    seed = config.seed_model
    seed_config = None
    if seed.kind == "pretrained":
        path = seed_path(seed)
        seed_config = pretrained.read_config(path, "the seed")
        seed_tokenizer = seed_tokenizer or pretrained.read_tokenizer(path)
    for name, source in config.experts.pretrained.items():
        path = pretrained.resolve(source, f"pretrained expert '{name}'")
        pretrained.check_expert(name, path, seed_tokenizer, seed_config, config.data.seq_len)


def seed_shape(spec, seq_len: int) -> tuple[int, int | None]:
    """(layers, positions) of the seed, from its config file or GGUF header, no weights."""
    if spec.kind == "tiny":
        return spec.num_layers, seq_len  # the tiny seed is built with seq_len positions
    layers, positions = pretrained.shape(seed_path(spec))
    return layers, spec.max_position_embeddings or positions


def seed_path(spec) -> Path:
    """A pretrained seed's directory or GGUF file."""
    return pretrained.resolve(spec.path or f"{pretrained.PACKAGE}{spec.package}", "the seed")


def _tokens(cfg: TrainConfig, batch_size: int, seq_len: int) -> int:
    return cfg.steps * cfg.grad_accum * batch_size * seq_len


# --- stages ---------------------------------------------------------------------------------


def make_tokenizer(run: Run):
    """Byte-level BPE on the train splits of every domain (tiny seed only)."""
    out = run.path("tokenizer")
    if not is_complete(out):
        once(_write_tokenizer, run, out)
    return load_tokenizer(out)


def _write_tokenizer(run: Run, out: Path) -> None:
    data = run.config.data
    with atomic_dir(out, "tokenizer", inputs=run.inputs) as tmp:
        texts = train_texts(
            data.sources.values(), run.config.seed, data.held_out_fraction, data.text_field
        )
        train_tokenizer(texts, data.vocab_size, tmp)
        _mark(tmp, "tokenizer")


def _save_model(run: Run, model: PreTrainedModel, tokenizer, out: Path, stage: str, **info) -> None:
    once(_write_model, model, tokenizer, out, stage, run.inputs, **info)


def _write_model(
    model: PreTrainedModel, tokenizer, out: Path, stage: str, inputs: dict, **info
) -> None:
    with atomic_dir(out, "model", inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _mark(tmp, stage, **info)


def tiny_seed_model(run: Run) -> LlamaForCausalLM:
    spec, tok = run.config.seed_model, run.tokenizer
    torch.manual_seed(run.config.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=run.config.data.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def make_seed(run: Run) -> Path:
    """The seed: pretrained from scratch on the mix of all domains, or a pretrained model."""
    out = run.path("seed")
    if is_complete(out):
        return out
    spec = run.config.seed_model
    if spec.kind == "pretrained":
        model, tokenizer = load_pretrained_seed(spec)
        _save_model(run, model, tokenizer, out, "seed", source=str(spec.path or spec.package))
        return out
    model = tiny_seed_model(run)
    domains = run.config.data.names
    budget = _tokens(spec.train, spec.batch_size, run.config.data.seq_len)
    sampler = run.sampler(domains, spec.mix, spec.batch_size, budget)
    result = run.train("seed", model, sampler, spec.train)
    _save_model(run, model, run.tokenizer, out, "seed", tokens=result.tokens)
    return out


def load_pretrained_seed(spec):
    """A pretrained seed from a directory, a `.gguf` file, or a package that ships a GGUF file."""
    model, tokenizer = pretrained.load_pretrained(seed_path(spec))
    if spec.max_position_embeddings:
        model.config.max_position_embeddings = spec.max_position_embeddings
    return model, tokenizer


def _link_copy(src: str, dst: str) -> None:
    """Branches never modify files in place, so hard links are safe and cost no disk."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def branch(run: Run) -> dict[str, Path]:
    """One copy of the seed per expert domain."""
    seed = make_seed(run)
    out = {}
    for domain in run.config.expert_domains:
        target = run.path("branches", domain)
        if not is_complete(target):
            once(_write_branch, seed, target, domain, run.inputs)
        out[domain] = target
    return out


def _write_branch(seed: Path, target: Path, domain: str, inputs: dict) -> None:
    with atomic_dir(target, "model", inputs=inputs) as tmp:
        shutil.copytree(seed, tmp, dirs_exist_ok=True, copy_function=_link_copy)
        _mark(tmp, "branch", domain=domain)


def train_expert(run: Run, domain: str) -> Path:
    """Continued pretraining of one branch on its own domain (independent of the others)."""
    if domain not in run.config.expert_domains:
        raise BtsError(
            f"'{domain}' is not an expert domain of this run: use {run.config.expert_domains}"
        )
    out = run.path("experts", domain)
    if is_complete(out):
        return out
    start = branch(run)[domain]
    model = load_causal_lm(start)
    spec = run.config.experts
    if not spec.train_embeddings:
        freeze_output_space(model)
    sampler = MixSampler.single(domain, run.corpus[domain].train, spec.batch_size, run.config.seed)
    result = run.train(f"experts/{domain}", model, sampler, spec.train)
    _save_model(run, model, run.tokenizer, out, "expert", domain=domain, tokens=result.tokens)
    return out


def expert(run: Run, name: str) -> Path:
    """An expert's directory: trained here on its domain, or a pretrained one imported."""
    if name in run.config.experts.pretrained:
        return import_expert(run, name)
    return train_expert(run, name)


def import_expert(run: Run, name: str) -> Path:
    """RUN/experts/<name>: a pretrained expert, checked against the run's seed and saved as
    the run's own constituent (GGUF de-quantised), so stitched models record its SHA-256."""
    out = run.path("experts", name)
    if is_complete(out):
        return out
    source = run.config.experts.pretrained[name]
    path = pretrained.resolve(source, f"pretrained expert '{name}'")
    check_pretrained_experts(_only_expert(run.config, name), run.tokenizer)
    model, tokenizer = pretrained.load_pretrained(path)
    _save_model(run, model, tokenizer or run.tokenizer, out, "expert", domain=name, source=source)
    return out


def _only_expert(config: RunConfig, name: str) -> RunConfig:
    experts = config.experts.model_copy(update={"pretrained": {name: config.experts.pretrained[name]}})
    return config.model_copy(update={"experts": experts})


def load_models(paths: dict[str, Path], dtype=None) -> dict[str, PreTrainedModel]:
    return {name: load_causal_lm(path, dtype) for name, path in paths.items()}


def stitch(run: Run) -> Path:
    """Freeze seed and experts; train only the stitch layers on a small mix of the domains."""
    return train_stitched(run, run.config, run.path("stitched"), "stitch")


HEADS_DIR = "stitched_heads"  # system bts_heads; its training state is RUN/train/stitch_heads


def stitch_heads(run: Run) -> Path:
    """The stitch stage again with the output stitch (`stitch.output: mixture`): system bts_heads."""
    return train_stitched(run, run.config.heads_config(), run.path(HEADS_DIR), "stitch_heads")


def train_stitched(run: Run, config: RunConfig, out: Path, stage: str) -> Path:
    """The stitch stage of `config` (the run's, or an ablation's) on the run's seed and experts."""
    if (out / STITCH_MANIFEST).is_file():
        return out
    model = build_stitched(run, config)
    model.train_only()
    if config.stitch.compile_frozen:
        compile_frozen_blocks(model)
    sampler = stitch_sampler(run, config.stitch_domains, config.stitch)
    run.train(stage, model, sampler, config.stitch.train)
    once(model.save_pretrained, out)
    return out


def compile_frozen_blocks(model: StitchedModel) -> None:
    """torch.compile every frozen decoder block of the hub and experts, in place
    (`stitch.compile_frozen`). Blocks of one class share their compiled graphs (weights are
    graph inputs), so the first step compiles a few graphs, not one per block; the stitch layers
    stay eager. The module tree and state dict are unchanged; the blocks stay compiled, also
    where the same constituent objects are used elsewhere."""
    on_cpu = next(model.hub.parameters()).device.type == "cpu"
    if on_cpu and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise BtsError(
            "stitch.compile_frozen needs a C++ compiler on CPU (torch.compile's backend) and "
            "none is on PATH: install g++ or set stitch.compile_frozen: false"
        )
    for name, constituent in {HUB: model.hub, **model.experts}.items():
        for layer in adapter(constituent, name).layers:
            layer.compile(dynamic=False)


def build_stitched(run: Run, config: RunConfig) -> StitchedModel:
    """Hub and spokes as `config.stitch` names them, stitch layers freshly initialised."""
    spec = config.stitch
    spokes = {d: expert(run, d) for d in config.stitched_experts}
    if spec.hub == "seed":
        hub = make_seed(run)
    else:  # an expert as the hub (paper ablation): the seed becomes one of the spokes
        hub, spokes = expert(run, spec.hub), {"seed": make_seed(run), **spokes}
    dtype = MANIFEST_DTYPES[spec.constituent_dtype]
    hub_model = load_causal_lm(hub, dtype)
    layers = hub_model.config.num_hidden_layers
    model = StitchedModel(
        hub_model, load_models(spokes, dtype), spec.spec(layers, seed=config.seed + spec.train.seed)
    )
    return model.set_inference(checkpoint_frozen=spec.checkpoint_frozen)


def stitch_sampler(run: Run, domains: list[str], spec: StitchConfig) -> MixSampler:
    """The stitch mix; `stitch.train.seed` (0 by default) offsets its data order from the run's
    seed, so a repeat with another training seed sees other batches, not only other dropout."""
    budget = _tokens(spec.train, spec.batch_size, run.config.data.seq_len)
    sampler = run.sampler(domains, spec.mix, spec.batch_size, budget)
    sampler.seed = run.config.seed + spec.train.seed
    return sampler


def add_expert(
    run: Run,
    stitched: Path,
    name: str,
    expert: Path,
    out: Path,
    steps: int | None = None,
    force: bool = False,
) -> Path:
    """Stitch in a new expert and train only its stitch parameters on a mix including its domain.

    The old stitched directory is left untouched; the result is written to `out`. Training
    state lives beside `out` under a name keyed by (stitched, name, expert), so an interrupted
    call resumes only when repeated with the same inputs.
    """
    if steps is not None and steps < 1:
        raise BtsError(f"--steps is {steps}: give at least 1 training step (or omit it)")
    if name not in run.config.data.names:
        raise BtsError(
            f"no data for '{name}': the new expert's domain must be in data.domains "
            f"{run.config.data.names}"
        )
    inputs = {**stitched_inputs(stitched), "the new expert": Path(expert), **run.inputs}
    check_target(out, inputs)
    check_replaceable(out, "stitched", force)
    model = StitchedModel.from_pretrained(stitched)
    model.add_expert(name, load_causal_lm(expert))
    model.train_only(expert=name)
    spec = run.config.stitch
    cfg = spec.train if steps is None else spec.train.model_copy(update={"steps": steps})
    sampler = stitch_sampler(run, model.expert_names, spec)
    key = json.dumps([str(Path(stitched).resolve()), name, str(Path(expert).resolve())])
    state = out.parent / f".{out.name}.train-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    for other in out.parent.glob(f".{out.name}.train-*"):
        if other != state:  # left by an interrupted call with other inputs: not resumable here
            shutil.rmtree(other, ignore_errors=True)
    train(model, sampler.batch, cfg, state, name=f"add-expert {name}")
    once(model.save_pretrained, out, force=force)
    shutil.rmtree(state, ignore_errors=True)
    return out


def remove_expert(stitched: Path, name: str, out: Path, force: bool = False) -> Path:
    """Drop an expert and its stitch parameters, no training; the old directory stays intact."""
    check_target(out, stitched_inputs(stitched))
    check_replaceable(out, "stitched", force)
    model = StitchedModel.from_pretrained(stitched)
    model.remove_expert(name)
    once(model.save_pretrained, out, force=force)
    return out


def baselines(run: Run) -> dict[str, Path]:
    """Every baseline system the config enables (`bts.baselines.registry`: merges, BTX
    variants, expert routing, BAM with and without adapters), from the same seed and experts.

    Trained ones get the stitch stage's mix and number of tokens. BTM (an output ensemble) has
    nothing to build; `bts.compare` assembles it from the seed and experts.
    """
    seed = make_seed(run)
    experts = {d: expert(run, d) for d in run.config.expert_names}
    return {
        system.name: _baseline(run, system, seed, experts)
        for system in baseline_systems(run.config)
        if system.baseline.kind is not None
    }


def baseline_systems(config: RunConfig) -> list[registry.System]:
    """The baseline systems this run builds: those the config enables, less the ones that
    need every expert in the seed's shape when a pretrained expert has another."""
    skip = shape_difference(config) is not None
    return [s for s in registry.enabled_systems(config.baselines) if not (skip and s.baseline.one_shape)]


def shape_difference(config: RunConfig) -> str | None:
    """Why merges, BTX and BAM cannot run here (a pretrained expert of another shape or
    family than the seed), or None. Read from configs, no weights."""
    if not config.experts.pretrained or config.seed_model.kind != "pretrained":
        return None  # experts trained here always have the seed's shape
    seed = pretrained.read_config(seed_path(config.seed_model), "the seed")
    for name, source in config.experts.pretrained.items():
        path = pretrained.resolve(source, f"pretrained expert '{name}'")
        found = mismatch(seed, pretrained.read_config(path, name), "merge")
        if found is not None:
            field, ours, theirs = found
            return f"expert '{name}' has {field} {ours} against the seed's {theirs}"
    return None


def _baseline(run: Run, system: registry.System, seed: Path, experts: dict[str, Path]) -> Path:
    """RUN/baselines/<name>: written as is (a merge) or trained, unless already complete."""
    hooks, target = system.hooks, run.path("baselines", system.name)
    if (target / (hooks.manifest or STAGE_MARKER)).is_file():
        return target
    if hooks.write is not None:
        once(_write_baseline, hooks.write, system.spec, seed, experts, target)
        return target
    model = hooks.build(system.spec, seed, experts)
    hooks.trainable(model, system.spec)
    result = run.train(system.name, model, *_stitch_budget(run, system))
    if hooks.save is not None:
        once(hooks.save, model, target)
    else:
        _save_model(run, model, run.tokenizer, target, system.name, tokens=result.tokens)
    return target


def _stitch_budget(run: Run, system: registry.System) -> tuple[MixSampler, TrainConfig]:
    """The stitch stage's sampler and schedule (same mix, same tokens) for a trained baseline,
    at its own learning rate (`registry.BASELINE_LR`), unless its config key sets a schedule."""
    stitch_spec = run.config.stitch
    rate = {} if system.lr is None else {"lr": system.lr}
    cfg = system.schedule or stitch_spec.train.model_copy(update=rate)
    return stitch_sampler(run, run.config.stitch_domains, stitch_spec), cfg


def _write_baseline(
    write: Callable, spec, seed: Path, experts: dict[str, Path], target: Path
) -> None:
    """A baseline made without training (a merge), then its stage marker with `write`'s fields."""
    _mark(target, **write(spec, seed, experts, target))
