"""Baselines BTS is compared against: weight merges (`merges`) and Branch-Train-MiX (`btx`).

Both take the same inputs as stitching: a seed directory and expert directories branched from it,
each a `save_pretrained` causal LM with its tokenizer files beside the weights.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from bts.errors import BtsError

# Fields that must agree for weights to line up tensor by tensor.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def check_family(seed_dir: Path, expert_dirs: Mapping[str, Path]) -> PretrainedConfig:
    """Return the seed's config after checking every expert has the seed's shapes and a tokenizer."""
    if not expert_dirs:
        raise BtsError("no experts given: pass at least one expert directory")
    seed = _load_config("seed", seed_dir)
    for name, path in expert_dirs.items():
        expert = _load_config(f"expert {name!r}", path)
        for field in SHAPE_FIELDS:
            ours, theirs = getattr(expert, field, None), getattr(seed, field, None)
            if ours != theirs:
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
    return AutoConfig.from_pretrained(path)


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty sibling of `out_dir` that replaces `out_dir` only if the block succeeds.

    Readers therefore never see a half-written output, and a failure leaves nothing behind.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not overwrite:
        raise BtsError(f"{out_dir} already exists: remove it or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
