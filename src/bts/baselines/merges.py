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
from typing import Literal

import numpy as np
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bts.baselines import check_family
from bts.errors import BtsError
from bts.fileio import atomic_dir

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_ties"]
_SPARSE = ("ties", "dare_ties")
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
        if self.method not in _SPARSE and self.density is not None:
            raise ValueError(f"density applies to {' and '.join(_SPARSE)}, not {self.method}")
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
    if spec.method in _SPARSE:
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
