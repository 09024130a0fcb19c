"""`bts export`: a stitched model directory -> one self-contained Hugging Face model directory.

A stitched directory holds only stitch weights and a manifest that points at its constituents'
directories. An export holds everything (config, hub + experts + stitch weights in safetensors,
the hub's tokenizer and generation config, and the modelling code), so it can be copied, loaded
with `AutoModelForCausalLM.from_pretrained` and evaluated by tools that know nothing about bts.
docs/export.md describes the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from bts.errors import BtsError
from bts.fileio import atomic_dir, check_replaceable, check_target
from bts.hf import BtsStitchedForCausalLM
from bts.stitch import StitchedModel
from bts.stitch_io import read_manifest, stitched_inputs

PROVENANCE = "bts_export.json"
MAX_SHARD_SIZE = "2GB"


def hub_directory(stitched_dir: Path) -> Path:
    """Where the hub of a stitched directory lives (its tokenizer is the model's tokenizer)."""
    info = read_manifest(stitched_dir)
    return (Path(stitched_dir) / info["hub"]["path"]).resolve()


def load_tokenizer(hub_dir: Path):
    """The hub's tokenizer (the stitched model's), or one line saying how to save it."""
    try:
        return AutoTokenizer.from_pretrained(hub_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BtsError(
            f"the hub at {hub_dir} has no loadable tokenizer ({type(err).__name__}): save the "
            "tokenizer into the hub's directory (tokenizer.save_pretrained) and export again"
        ) from err


def export(stitched_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write `out_dir` atomically from `stitched_dir` (constituents verified by SHA-256).

    An existing `out_dir` is replaced only if it is an earlier export (or with `force`); one
    that holds the stitched model or a constituent, or lies inside one, is always refused.
    """
    stitched_dir, out_dir = Path(stitched_dir), Path(out_dir)
    info = read_manifest(stitched_dir)  # one clear line if this is not a stitched directory
    inputs = stitched_inputs(stitched_dir)
    check_target(out_dir, inputs)
    check_replaceable(out_dir, "export", force)
    tokenizer = load_tokenizer(hub_directory(stitched_dir))  # fail before the slow part
    model = StitchedModel.from_pretrained(stitched_dir)  # refuses missing or changed constituents
    wrapper = BtsStitchedForCausalLM.from_stitched(model)
    with atomic_dir(out_dir, "export", force=force, inputs=inputs) as tmp:
        wrapper.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(stitched_dir.resolve()),
            "hub_sha256": info["hub"]["sha256"],
            "experts_sha256": {n: e["sha256"] for n, e in info["experts"].items()},
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir
