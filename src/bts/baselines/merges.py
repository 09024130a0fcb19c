"""Weight-merging baselines: model soup, task arithmetic, TIES and DARE-TIES, run by mergekit.

Each method is a small config builder registered by name (mergekit's plugin style): it turns a
`MergeSpec` into a mergekit `MergeConfiguration`; `merge_models` runs it and writes a model
directory that `AutoModelForCausalLM.from_pretrained` loads, tokenizer included.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from bts.baselines import check_family
from bts.baselines.registry import Hooks
from bts.baselines.specs import DEFAULT_MERGES, SPARSE_METHODS, MergeMethod, MergeSpec
from bts.errors import BtsError
from bts.fileio import atomic_dir
from bts.models import load_causal_lm

__all__ = [
    "DEFAULT_MERGES",
    "HOOKS",
    "MERGE_METHODS",
    "MergeMethod",
    "MergeSpec",
    "merge_configuration",
    "merge_models",
    "register",
]

ConfigBuilder = Callable[[MergeSpec, Path, Mapping[str, Path]], dict]
MERGE_METHODS: dict[str, ConfigBuilder] = {}


def register(*names: str) -> Callable[[ConfigBuilder], ConfigBuilder]:
    """Make a config builder available under the given method names."""

    def add(builder: ConfigBuilder) -> ConfigBuilder:
        for name in names:
            MERGE_METHODS[name] = builder
        return builder

    return add


def _model(path: Path, **parameters: float) -> dict:
    return {"model": str(path), "parameters": parameters}


@register("linear")
def _model_soup(spec: MergeSpec, seed_dir: Path, expert_dirs: Mapping[str, Path]) -> dict:
    """Model soup: the (weighted) mean of the seed and the experts, as the BTS paper averages
    them, every ingredient with the same weight; `include_seed=False` averages the experts alone.
    """
    ingredients = [seed_dir] if spec.include_seed else []
    ingredients += expert_dirs.values()
    return {
        "merge_method": "linear",
        "models": [_model(path, weight=spec.weight) for path in ingredients],
        "parameters": {"normalize": spec.normalize},
    }


@register("task_arithmetic", "ties", "dare_ties")
def _task_vectors(spec: MergeSpec, seed_dir: Path, expert_dirs: Mapping[str, Path]) -> dict:
    """seed + lambda * combine(weight * (expert - seed)), the seed being mergekit's base model."""
    per_expert = {"weight": spec.weight}
    if spec.method in SPARSE_METHODS:
        per_expert["density"] = 0.5 if spec.density is None else spec.density
    return {
        "merge_method": spec.method,
        "base_model": str(seed_dir),
        "models": [_model(path, **per_expert) for path in expert_dirs.values()],
        "parameters": {
            "normalize": spec.normalize,
            "lambda": 1.0 if spec.lambda_ is None else spec.lambda_,
        },
    }


def merge_configuration(
    spec: MergeSpec, seed_dir: Path, expert_dirs: Mapping[str, Path], out_dtype: str = "float32"
) -> MergeConfiguration:
    """The mergekit configuration for `spec`, with absolute paths; arithmetic is in float32."""
    seed_dir = Path(seed_dir).resolve()
    expert_dirs = {name: Path(path).resolve() for name, path in expert_dirs.items()}
    raw = MERGE_METHODS[spec.method](spec, seed_dir, expert_dirs)
    return MergeConfiguration.model_validate({**raw, "dtype": "float32", "out_dtype": out_dtype})


def merge_models(
    spec: MergeSpec,
    seed_dir: Path,
    expert_dirs: Mapping[str, Path],
    out_dir: Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Merge the experts and the seed (except in an experts-only soup) into `out_dir`, atomically.

    `out_dir` gets the weights (in the seed's dtype), config, tokenizer and the replayable
    `mergekit_config.yml`. Returns `out_dir`.
    """
    seed_config = check_family(Path(seed_dir), expert_dirs)
    out_dtype = str(seed_config.dtype or torch.float32).removeprefix("torch.")
    config = merge_configuration(spec, seed_dir, expert_dirs, out_dtype)
    # Paths are absolute and no model card is written: mergekit would otherwise ask the Hub
    # whether a relative path names a repository, which fails offline.
    options = MergeOptions(
        device="cpu",
        write_model_card=False,
        copy_tokenizer=True,
        random_seed=spec.random_seed,
        quiet=True,
    )
    out_dir = Path(out_dir).resolve()
    inputs = {
        "the seed": Path(seed_dir),
        **{f"expert '{n}'": Path(p) for n, p in expert_dirs.items()},
    }
    with atomic_dir(out_dir, "model", overwrite=overwrite, inputs=inputs) as tmp:
        with _caller_rng_kept():
            run_merge(config, str(tmp), options=options)
        if not (tmp / "tokenizer_config.json").is_file():
            raise BtsError(f"mergekit wrote no tokenizer for {out_dir.name}: check {seed_dir}")
        (tmp / "mergekit_config.yml").write_text(config.to_yaml() + "\n")
    return out_dir


@contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """Restore the global RNGs that mergekit reseeds (random, numpy, torch) after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _write(spec: MergeSpec, seed_dir: Path, expert_dirs: Mapping[str, Path], out_dir: Path) -> dict:
    """The pipeline's merge: `out_dir` written (replacing a partial one); its stage marker."""
    merge_models(spec, seed_dir, expert_dirs, out_dir, overwrite=True)
    return {"stage": "merge", "method": spec.method}


HOOKS = Hooks(write=_write, load=load_causal_lm)  # a merge is a plain causal LM
