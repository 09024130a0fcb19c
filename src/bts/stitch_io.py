"""Saving and loading stitched models: stitch weights plus a manifest of verified constituents.

A stitched model directory holds only what was trained (`stitch.safetensors`) and `bts_stitch.json`,
which names each constituent's directory and the SHA-256 of its weights. Constituents are loaded
from their own directories and refused if their weights changed since stitching, because stitch
layers trained against other weights would silently compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bts.errors import BtsError
from bts.fileio import atomic_dir
from bts.models import constituent_entry, load_constituent
from bts.stitch import StitchedModel, StitchPoint

MANIFEST = "bts_stitch.json"
WEIGHTS = "stitch.safetensors"
FORMAT = "bts-stitched-model"


def manifest(model: StitchedModel, directory: Path) -> dict:
    """The manifest that `save_stitched` writes, with paths relative to `directory`."""
    return {
        "format": FORMAT,
        "version": 1,
        "placement": [[p.after_layer, p.kind] for p in model.placement],
        "gate_dropout": model.gate_dropout,
        "gate_gain": model.gate_gain,
        "hub": constituent_entry(model.hub, "the hub", directory),
        "experts": {
            n: constituent_entry(m, f"expert '{n}'", directory) for n, m in model.experts.items()
        },
    }


def save_stitched(model: StitchedModel, directory: Path) -> None:
    """Write stitch weights and manifest atomically: a crash leaves no half-written directory."""
    with atomic_dir(directory) as tmp:
        info = manifest(model, tmp)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.stitches.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BtsError(
            f"{path} not found: give a directory written by StitchedModel.save_pretrained"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BtsError(f"{path} is not valid JSON ({err.msg}): re-save the stitched model") from err
    if info.get("format") != FORMAT:
        raise BtsError(f"{path} is not a bts stitched-model manifest: re-save the stitched model")
    return info


def _load_verified(directory: Path, entry: dict, role: str):
    return load_constituent(directory, entry, role, "it was stitched", "stitch again")


def load_stitched(directory: Path) -> StitchedModel:
    """Load constituents from the manifest (verifying their hashes), then the stitch weights."""
    directory = Path(directory)
    info = read_manifest(directory)
    hub = _load_verified(directory, info["hub"], "the hub")
    experts = {
        name: _load_verified(directory, entry, f"expert '{name}'")
        for name, entry in info["experts"].items()
    }
    placement = [StitchPoint(int(a), kind) for a, kind in info["placement"]]
    model = StitchedModel(hub, experts, placement, info["gate_dropout"], info.get("gate_gain", 1.0))
    try:
        weights = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise BtsError(
            f"cannot read {directory / WEIGHTS} ({err}): the stitch weights are corrupt; stitch again"
        ) from err
    missing, unexpected = model.stitches.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise BtsError(
            f"{directory / WEIGHTS} does not match its manifest (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): re-save the stitched model"
        )
    return model
