"""Constituent models: loading (safetensors or GGUF, never pickles), freezing, hashing, manifest
entries, and the token-level helpers every system shares (positions, the LM loss).

Reaching inside a model (embeddings, blocks, head) is bts.arch's: one adapter per family.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from bts.errors import BtsError

HUB = "hub"  # the hub's name among a stitched model's constituents (never an expert's)


def position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int = 0
) -> torch.Tensor:
    """Positions count real tokens only, so left-padded prompts get the positions they would
    alone (padding gets 1, as transformers' generate gives it)."""
    length = input_ids.shape[1]
    if attention_mask is None:
        return torch.arange(past, past + length, device=input_ids.device)[None].expand(
            input_ids.shape[0], -1
        )
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -length:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, transformers' convention (labels are shifted here, -100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a constituent: no weight gradients, no optimizer state, no dropout."""
    model.requires_grad_(False)
    return model.eval()


def freeze_output_space(model: PreTrainedModel) -> None:
    """Freeze input embeddings, final norm and LM head: the space the hub's head reads."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings(), model.model.norm):
        module.requires_grad_(False)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every weight (name, dtype, shape, bytes), in name order; tied weights once."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# Weight files of a model directory that bts reads (one file, or shards listed by the index),
# and suffixes of the pickled or foreign weight files it refuses (named in the error).
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")

# The dtypes a manifest entry may name: what constituent_entry writes and load_constituent reads.
MANIFEST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from a local directory (safetensors only) or a local `.gguf` file.

    Weight files are never unpickled: a pickle (`pytorch_model.bin`, `*.pt`) can run arbitrary
    code when loaded, so a directory without safetensors weights is refused, not loaded.
    """
    path = Path(path)
    if not path.exists():
        raise BtsError(f"model not found at {path}: give a directory saved with save_pretrained")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if path.is_file() and path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    if not (path / "config.json").is_file():
        raise BtsError(f"{path} has no config.json: give a directory saved with save_pretrained")
    if not any((path / name).is_file() for name in _SAFETENSORS):
        others = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLES and p.is_file())
        found = f"only {', '.join(others)}" if others else "no weight files at all"
        raise BtsError(
            f"{path} has no safetensors weights ({found}): bts never unpickles weight files; "
            "convert it with `save_pretrained(..., safe_serialization=True)`"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BtsError(f"cannot load model from {path} ({first}): re-save it") from err


def constituent_entry(model: nn.Module, role: str, directory: Path) -> dict:
    """A manifest entry for a frozen constituent: its directory relative to `directory` (so the
    two can move together), the SHA-256 of its weights and its dtype."""
    location = getattr(model, "name_or_path", "") or ""
    if not location or not (Path(location) / "config.json").is_file():
        raise BtsError(
            f"{role} has no saved location ('{location}'): save it with save_pretrained and load "
            "it from that directory first"
        )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if dtype not in MANIFEST_DTYPES:
        raise BtsError(
            f"{role} has dtype {dtype}, which a manifest cannot record: convert it to one of "
            f"{', '.join(MANIFEST_DTYPES)} (model.to(torch.float32)) first"
        )
    return {
        "path": os.path.relpath(Path(location).resolve(), Path(directory).resolve()),
        "sha256": weights_sha256(model),
        "dtype": dtype,
    }


def load_constituent(directory: Path, entry: dict, role: str, since: str, redo: str):
    """Load a manifest entry's model, refusing it if its weights changed: parameters trained
    against other weights (stitch layers, a router) would silently compute something else.

    The caller has checked the entry's shape (path and sha256 strings); the dtype is checked
    here, so a hand-edited one is refused rather than looked up as any attribute of `torch`."""
    name = entry.get("dtype", "float32")
    if not isinstance(name, str) or name not in MANIFEST_DTYPES:
        raise BtsError(
            f"{role} has dtype {name!r} in its manifest, not one of "
            f"{', '.join(MANIFEST_DTYPES)}: {redo}"
        )
    location = (Path(directory) / entry["path"]).resolve()
    model = load_causal_lm(location, dtype=MANIFEST_DTYPES[name])
    if weights_sha256(model) != entry["sha256"]:
        raise BtsError(
            f"{role} at {location} changed since {since} (SHA-256 mismatch): restore its "
            f"weights or {redo}"
        )
    return model
