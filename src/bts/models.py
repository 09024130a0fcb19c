"""Constituent models: loading, the Llama-layout adapter, compatibility checks, freezing, hashing.

Everything `stitch.py` needs to reach inside a Hugging Face causal LM lives here, so supporting a
new architecture is one adapter, not edits across the stitching code.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from bts.errors import BtsError

_REQUIRED = ("embed_tokens", "layers", "norm", "rotary_emb")
HUB = "hub"  # the hub's name among a stitched model's constituents (never an expert's)


@dataclass(frozen=True)
class Decoder:
    """The parts of a Llama-layout causal LM that stitching walks through, layer by layer."""

    model: PreTrainedModel

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        return self.inner.rotary_emb(hidden, position_ids=position_ids)

    def layer_masks(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache,
        position_ids: torch.Tensor,
    ) -> list:
        """One attention mask per layer, as the model's own forward builds them (full or sliding)."""
        config = self.model.config
        kwargs = dict(
            config=config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
        )
        types = layer_types(config)
        masks = (
            {"full_attention": create_causal_mask(**kwargs)} if "full_attention" in types else {}
        )
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return [masks[t] for t in types]

    def context(self, hidden, attention_mask, cache, positions) -> tuple:
        """What every block of one forward shares: the per-layer masks and the rotary tables."""
        masks = self.layer_masks(hidden, attention_mask, cache, positions)
        return masks, self.rotary(hidden, positions)

    def block(self, index: int, hidden, positions, context: tuple, cache) -> torch.Tensor:
        """Decoder block `index` on `hidden`, as the model's own forward runs it."""
        masks, rotary = context
        out = self.layers[index](
            hidden,
            attention_mask=masks[index],
            position_embeddings=rotary,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own output head: final norm, then LM head."""
        return self.model.lm_head(self.inner.norm(hidden))


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


def layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[: config.num_hidden_layers]
    sliding = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    kind = "sliding_attention" if sliding else "full_attention"
    return [kind] * config.num_hidden_layers


def decoder(model: nn.Module, role: str) -> Decoder:
    """Wrap a causal LM, refusing layouts other than Llama's (model.embed_tokens/layers/norm/...)."""
    inner = getattr(model, "model", None)
    missing = [name for name in _REQUIRED if not hasattr(inner, name)]
    if inner is None or missing or not hasattr(model, "lm_head"):
        raise BtsError(
            f"{role} ({type(model).__name__}) does not have the Llama layout "
            f"(missing {', '.join(missing) or 'model/lm_head'}): use a Llama, Mistral or Qwen2-style "
            "causal LM"
        )
    return Decoder(model)


def check_compatible(hub: PreTrainedModel, expert: PreTrainedModel, name: str) -> None:
    """Stitching pairs hidden states layer by layer, so depth, width and vocabulary must match."""
    for attr, what in (
        ("num_hidden_layers", "layers"),
        ("hidden_size", "hidden size"),
        ("vocab_size", "vocabulary size"),
    ):
        got, want = getattr(expert.config, attr), getattr(hub.config, attr)
        if got != want:
            raise BtsError(
                f"expert '{name}' has {what} {got} but the hub has {want}: "
                "experts must be branched from the hub (same architecture and tokenizer)"
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
