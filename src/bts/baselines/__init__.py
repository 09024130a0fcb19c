"""Baselines BTS is compared against, the paper's whole table: weight merges (`merges`), the
BTM output ensemble (`btm`), whole-model expert routing (`routing`), Branch-Train-MiX with soft,
sampled top-1 and top-2 routing (`btx`) and Branch-Attend-Mix (`bam`).

All take the same inputs as stitching: a seed directory and expert directories branched from it,
each a `save_pretrained` causal LM with its tokenizer files beside the weights.

`registry` lists them (names, config keys, report rows) and `specs` holds their config
sections; both stay light, and importing this package imports no model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bts.errors import BtsError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

def check_family(
    seed_dir: Path, expert_dirs: Mapping[str, Path], purpose: str = "merge"
) -> PretrainedConfig:
    """Return the seed's config after checking every expert has a tokenizer and agrees with the
    seed on the fields `purpose` names (bts.arch.SHAPE_FIELDS): "merge", the seed's exact shape,
    for weights that line up tensor by tensor; "stitch", one vocabulary, for whole models mixed or routed by their outputs."""
    if not expert_dirs:
        raise BtsError("no experts given: pass at least one expert directory")
    from bts.arch import mismatch  # the one shape check; loads no model code

    seed = _load_config("seed", seed_dir)
    for name, path in expert_dirs.items():
        found = mismatch(seed, _load_config(f"expert {name!r}", path), purpose)
        if found is not None:  # weights must line up tensor by tensor
            field, ours, theirs = found
            raise BtsError(
                f"expert {name!r} has {field}={ours} but the seed has {theirs}: "
                "experts must be branched from the seed"
            )
    return seed


def _load_config(role: str, path: Path) -> PretrainedConfig:
    """The config of one model directory, refusing directories that lack weights' config or a tokenizer."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BtsError(
            f"{role} directory {path} has no config.json: pass a save_pretrained directory"
        )
    has_vocab = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    if not ((path / "tokenizer_config.json").is_file() and has_vocab):
        raise BtsError(
            f"{role} directory {path} has no tokenizer files: save the tokenizer into it "
            "(tokenizer.save_pretrained)"
        )
    from transformers import AutoConfig  # here: the registry and specs import this package

    return AutoConfig.from_pretrained(path)
