"""Saving and loading stitched models: stitch weights plus a manifest of verified constituents.

A stitched model directory holds only what was trained (`stitch.safetensors`) and `bts_stitch.json`,
which names each constituent's directory and the SHA-256 of its weights. Constituents are loaded
from their own directories and refused if their weights changed since stitching, because stitch
layers trained against other weights would silently compute something else.

The manifest is validated field by field on load (one error line naming the first bad field), and
everything in it that changes the model's outputs is bound to the stitch weights by a digest kept
in the metadata of `stitch.safetensors`: a hand-edited gate_gain, placement or expert name is
refused instead of silently computing something the stitch layers were not trained for.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import get_args

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bts.errors import BtsError
from bts.fileio import STITCH_MANIFEST, atomic_dir
from bts.models import MANIFEST_DTYPES, constituent_entry, load_constituent
from bts.spec import CHOICES, StitchKind, StitchPoint, StitchSpec

MANIFEST = STITCH_MANIFEST
WEIGHTS = "stitch.safetensors"
FORMAT = "bts-stitched-model"
VERSION = 1  # what save_stitched writes
VERSIONS = (1,)  # what load_stitched reads
DIGEST = "bts_manifest_sha256"  # key of the manifest digest in the safetensors metadata
KINDS: tuple[str, ...] = get_args(StitchKind)
# spec fields added after version 1's first manifests: absent means the default (StitchSpec's)
OPTIONS = CHOICES
_FIELDS = (
    "format", "version", "placement", "gate_dropout", "gate_gain", *OPTIONS, "init_seed",
    "expert_dropout", "depth_maps", "hub", "experts",
)
_ENTRY_FIELDS = ("path", "sha256", "dtype")
_OUTPUT = "output."  # the output stitch's weights, beside the stitch layers' in one file
_RESAVE = "re-save the stitched model"


def manifest(model, directory: Path) -> dict:
    """The manifest that `save_stitched` writes, with paths relative to `directory`."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "placement": [[p.after_layer, p.kind] for p in model.spec.placement],
        **model.spec.options(),
        "hub": constituent_entry(model.hub, "the hub", directory),
        "experts": {
            n: constituent_entry(m, f"expert '{n}'", directory) for n, m in model.experts.items()
        },
    }


def manifest_spec(info: dict) -> StitchSpec:
    """The StitchSpec a (validated) manifest records; defaults for fields older ones lack."""
    placement = tuple(StitchPoint(a, kind) for a, kind in info["placement"])
    keys = (*OPTIONS, "gate_gain", "init_seed", "expert_dropout", "depth_maps")
    known = {k: info[k] for k in keys if k in info}
    return StitchSpec(placement=placement, gate_dropout=info["gate_dropout"], **known)


def manifest_digest(info: dict) -> str:
    """SHA-256 over what in a (validated) manifest changes outputs: the version, placement, gate
    dropout and gain, and each name (the hub, then every expert in order) bound to the SHA-256
    and dtype of its weights. Paths are left out: a run directory may move as a whole."""
    content = {
        "version": info["version"],
        "placement": sorted([int(a), str(kind)] for a, kind in info["placement"]),
        "gate_dropout": float(info["gate_dropout"]),
        "gate_gain": float(info.get("gate_gain", 1.0)),
        "constituents": [
            [name, entry["sha256"], entry.get("dtype", "float32")]
            for name, entry in [("hub", info["hub"]), *info["experts"].items()]
        ],
    }
    # only the options a manifest records: a manifest saved before they existed keeps its digest;
    # how fresh weights started (init) does not change what saved weights compute
    content |= {key: info[key] for key in OPTIONS if key in info and key != "init"}
    if info.get("depth_maps"):  # explicit maps change which expert blocks the stitches read
        content["depth_maps"] = info["depth_maps"]
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def save_stitched(model, directory: Path, force: bool = False) -> None:
    """Write stitch weights and manifest atomically: a crash leaves no half-written directory.
    An existing `directory` is replaced only if it is a stitched model (or with `force`)."""
    roles = {"the hub": model.hub, **{f"expert '{n}'": m for n, m in model.experts.items()}}
    inputs = {role: Path(m.name_or_path) for role, m in roles.items() if m.name_or_path}
    with atomic_dir(directory, "stitched", force=force, inputs=inputs) as tmp:
        info = manifest(model, tmp)
        weights = {k: v.detach().cpu().contiguous() for k, v in stitch_state_dict(model).items()}
        metadata = {"format": FORMAT, DIGEST: manifest_digest(info)}
        save_file(weights, str(tmp / WEIGHTS), metadata=metadata)
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")


def stitched_inputs(stitched: Path) -> dict[str, Path]:
    """A stitched directory and the constituent directories its manifest names (role -> path):
    what an output made from it must never overwrite."""
    info = read_manifest(stitched)
    roles = {"the stitched model": Path(stitched)}
    roles["the hub"] = Path(stitched) / info["hub"]["path"]
    for name, entry in info["experts"].items():
        roles[f"expert '{name}'"] = Path(stitched) / entry["path"]
    return roles


def read_manifest(directory: Path) -> dict:
    """The manifest of a stitched directory, refused (one line naming the field) unless valid."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BtsError(
            f"{path} not found: give a directory written by StitchedModel.save_pretrained"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BtsError(f"{path} is not valid JSON ({err.msg}): {_RESAVE}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise BtsError(f"{path} is not a bts stitched-model manifest: {_RESAVE}")
    _validate(path, info)
    return info


def _bad(path: Path, field: str, problem: str, fix: str = _RESAVE) -> BtsError:
    return BtsError(f"{path}: field '{field}' {problem}: {fix}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _validate(path: Path, info: dict) -> None:
    """Raise for the first problem in `info`, in the order the fields are written."""
    unknown = [key for key in info if key not in _FIELDS]
    if unknown:
        raise _bad(path, unknown[0], "is not a manifest field", f"remove it or {_RESAVE}")
    for key in ("version", "placement", "gate_dropout", "hub", "experts"):
        if key not in info:
            raise _bad(path, key, "is missing")
    version = info["version"]
    if not _is_int(version) or version not in VERSIONS:
        raise _bad(
            path,
            "version",
            f"is {version!r}, not a version this bts reads ({', '.join(map(str, VERSIONS))})",
            f"written by a newer bts? upgrade bts or {_RESAVE}",
        )
    placement = info["placement"]
    if not isinstance(placement, list) or not placement:
        raise _bad(path, "placement", "is not a non-empty list of [after_layer, kind]")
    for i, point in enumerate(placement):
        if not isinstance(point, list) or len(point) != 2:
            raise _bad(path, f"placement[{i}]", f"is {point!r}, not [after_layer, kind]")
        if not _is_int(point[0]) or point[0] < 0:
            raise _bad(path, f"placement[{i}][0]", f"is {point[0]!r}, not a non-negative integer")
        if point[1] not in KINDS:
            raise _bad(
                path, f"placement[{i}][1]", f"is {point[1]!r}, not one of {', '.join(KINDS)}"
            )
    dropout = info["gate_dropout"]
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise _bad(path, "gate_dropout", f"is {dropout!r}, not a number in [0, 1)")
    gain = info.get("gate_gain", 1.0)  # absent from manifests written before gate_gain existed
    if not _is_number(gain) or gain <= 0:
        raise _bad(path, "gate_gain", f"is {gain!r}, not a finite positive number")
    seed = info.get("init_seed", 0)
    if not _is_int(seed):
        raise _bad(path, "init_seed", f"is {seed!r}, not an integer")
    for key, allowed in OPTIONS.items():
        if key in info and (info[key] not in allowed or type(info[key]) is not type(allowed[0])):
            raise _bad(
                path, key, f"is {info[key]!r}, not one of {', '.join(map(repr, allowed))}"
            )
    _validate_entry(path, "hub", info["hub"])
    experts = info["experts"]
    if not isinstance(experts, dict):
        raise _bad(path, "experts", "is not an object mapping expert names to entries")
    for name, entry in experts.items():
        _validate_entry(path, f"experts.{name}", entry)
    _validate_depth_maps(path, info.get("depth_maps", {}), experts, len(placement))


def _validate_depth_maps(path: Path, maps, experts: dict, points: int) -> None:
    """Explicit maps name stitched experts and give one strictly increasing, non-negative
    block per stitch point (the expert's depth bounds them when it loads)."""
    if not isinstance(maps, dict):
        raise _bad(path, "depth_maps", "is not an object mapping expert names to block lists")
    for name, blocks in maps.items():
        field = f"depth_maps.{name}"
        if name not in experts:
            raise _bad(path, field, "names no stitched expert")
        if not isinstance(blocks, list) or len(blocks) != points:
            raise _bad(path, field, f"is {blocks!r}, not a list of {points} blocks (one a point)")
        if not all(_is_int(b) and b >= 0 for b in blocks) or blocks != sorted(set(blocks)):
            raise _bad(path, field, f"is {blocks!r}, not strictly increasing non-negative integers")


def _validate_entry(path: Path, field: str, entry) -> None:
    if not isinstance(entry, dict):
        raise _bad(path, field, "is not an object with path, sha256 and dtype")
    unknown = [key for key in entry if key not in _ENTRY_FIELDS]
    if unknown:
        raise _bad(
            path, f"{field}.{unknown[0]}", "is not an entry field", f"remove it or {_RESAVE}"
        )
    for key in ("path", "sha256"):
        if key not in entry:
            raise _bad(path, f"{field}.{key}", "is missing")
    if not isinstance(entry["path"], str) or not entry["path"]:
        raise _bad(path, f"{field}.path", f"is {entry['path']!r}, not a directory path")
    sha = entry["sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _bad(path, f"{field}.sha256", f"is {sha!r}, not 64 lowercase hex digits")
    dtype = entry.get("dtype", "float32")  # what load_constituent assumes when it is absent
    if not isinstance(dtype, str) or dtype not in MANIFEST_DTYPES:
        raise _bad(path, f"{field}.dtype", f"is {dtype!r}, not one of {', '.join(MANIFEST_DTYPES)}")


def _read_metadata(directory: Path) -> dict[str, str]:
    path = directory / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise _corrupt(path, err) from err


def _corrupt(path: Path, err: Exception) -> BtsError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return BtsError(f"cannot read {path} ({first}): the stitch weights are corrupt; stitch again")


def _check_digest(directory: Path, info: dict) -> None:
    saved = _read_metadata(directory).get(DIGEST)
    # Directories saved before the digest existed have none: they load as before (backward
    # compatibility), with only the field checks of read_manifest to guard their manifest.
    if saved is not None and saved != manifest_digest(info):
        raise BtsError(
            f"{directory / MANIFEST} was edited after saving (gate_gain/names/placement no longer "
            f"match {WEIGHTS}): undo the edit or {_RESAVE}"
        )


def _load_verified(directory: Path, entry: dict, role: str):
    return load_constituent(directory, entry, role, "it was stitched", "stitch again")


def load_stitched(directory: Path, cls):
    """Check the manifest against the stitch weights' digest, load constituents from the
    manifest (verifying their hashes), then the stitch weights. `cls` is the model class
    (`StitchedModel.from_pretrained` passes itself: this module does not import the model)."""
    directory = Path(directory)
    info = read_manifest(directory)
    _check_digest(directory, info)  # before the slow part: loading the constituents
    hub = _load_verified(directory, info["hub"], "the hub")
    experts = {
        name: _load_verified(directory, entry, f"expert '{name}'")
        for name, entry in info["experts"].items()
    }
    model = cls(hub, experts, manifest_spec(info))
    try:
        weights = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise _corrupt(directory / WEIGHTS, err) from err
    missing, unexpected = load_stitch_state_dict(model, weights)
    if missing or unexpected:
        raise BtsError(
            f"{directory / WEIGHTS} does not match its manifest (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): {_RESAVE}"
        )
    return model


def stitch_state_dict(model) -> dict:
    """What `save_stitched` writes: the stitch layers' weights, the output stitch's under
    'output.'."""
    weights = dict(model.stitches.state_dict())
    if model.output is not None:
        weights |= {f"{_OUTPUT}{k}": v for k, v in model.output.state_dict().items()}
    return weights


def load_stitch_state_dict(model, weights: dict) -> tuple[list, list]:
    """Load `stitch_state_dict`'s weights into `model`; return (missing, unexpected) keys."""
    own = {k[len(_OUTPUT) :]: v for k, v in weights.items() if k.startswith(_OUTPUT)}
    rest = {k: v for k, v in weights.items() if not k.startswith(_OUTPUT)}
    missing, unexpected = model.stitches.load_state_dict(rest, strict=False)
    if model.output is None:
        return list(missing), [*unexpected, *(_OUTPUT + k for k in own)]
    out_missing, out_unexpected = model.output.load_state_dict(own, strict=False)
    return (
        [*missing, *(_OUTPUT + k for k in out_missing)],
        [*unexpected, *(_OUTPUT + k for k in out_unexpected)],
    )
