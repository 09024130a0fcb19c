"""The adapter base class, its registry and the one shape check (see bts.arch).

Architecture adapters are the only way into a constituent's embeddings, blocks, rotary tables,
final norm and head, keyed by its decoder-layer class (as transformers' attention backends are
keyed by name in `ALL_ATTENTION_FUNCTIONS`).

An adapter also says how the batched kernels (bts.batched) group a block's weights, or that they
cannot (`stack_groups = None`: such a family always runs the per-model loop). A new family is
one file in this package that subclasses `Adapter` and calls `register`; `llama.py` covers the
Llama layout, which Mistral and Qwen2 share; `qwen3.py` and `gemma.py` (Gemma 2 and 3) the
families that differ from it in the batched kernels or the head.

`compatible` is the one shape check: which config fields must agree for stitching, for the
batched kernels, and for weight merges (tensor by tensor), with the first disagreement named.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from bts.errors import BtsError

# the config fields that must agree, by purpose (the first disagreement is reported)
Purpose = Literal["stitch", "stack", "merge"]
SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    # stitching mixes next-token distributions and reads one token sequence; depths are mapped
    # (bts.spec.depth_map) and widths projected (P_i is d_0 x d_i), so only the vocabulary binds
    "stitch": ("vocab_size",),
    # one batched kernel per block: every weight shape and the norm and activation agree
    "stack": (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "hidden_act", "rms_norm_eps",
    ),
    # weights line up tensor by tensor (merges, BTX, BAM)
    "merge": (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
    ),
}


# how messages name the fields people meet most
WORDS = {"num_hidden_layers": "layers", "hidden_size": "hidden size", "vocab_size": "vocabulary size"}


def config_value(config, field: str):
    """A config field, with head_dim derived where a config leaves it out."""
    value = getattr(config, field, None)
    if field == "head_dim" and value is None and getattr(config, "hidden_size", None):
        value = config.hidden_size // config.num_attention_heads
    return value


def mismatch(reference, other, purpose: Purpose) -> tuple[str, object, object] | None:
    """(field, other's value, reference's value) of the first field that disagrees, or None."""
    for field in SHAPE_FIELDS[purpose]:
        ours, theirs = config_value(other, field), config_value(reference, field)
        if ours != theirs:
            return field, ours, theirs
    return None


def check_compatible(hub: nn.Module, expert: nn.Module, name: str) -> None:
    """Refuse an expert whose vocabulary differs from the hub's: every constituent reads the
    same token ids. Depth, width and family may differ (docs/bring-your-own.md)."""
    found = mismatch(hub.config, expert.config, "stitch")
    if found is not None:
        field, got, want = found
        raise BtsError(
            f"expert '{name}' has {WORDS.get(field, field)} {got} but the hub has {want}: "
            "experts must use the hub's tokenizer (e.g. SmolLM2 135M/360M/1.7B together, or "
            "Qwen2.5 0.5B/1.5B); pick an expert trained with the hub's tokenizer"
        )


def layer_types(config) -> list[str]:
    """Each layer's attention kind ("full_attention" or "sliding_attention")."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[: config.num_hidden_layers]
    sliding = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    kind = "sliding_attention" if sliding else "full_attention"
    return [kind] * config.num_hidden_layers


class Adapter:
    """A causal LM seen as embeddings, blocks, rotary tables and a head. Subclasses name the
    decoder-layer classes they cover and, where the layout differs, override the accessors."""

    layer_classes: ClassVar[tuple[str, ...]] = ()
    # (StackedLayer field, [(module path inside a decoder layer, parameter name)]): how the
    # batched kernels stack one block; None: the kernels do not cover this family
    stack_groups: ClassVar[dict[str, list[tuple[str, str]]] | None] = None

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    @property
    def rotary_module(self) -> nn.Module:
        return self.inner.rotary_emb

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        return self.rotary_module(hidden, position_ids=position_ids)

    def layer_masks(self, embeds, attention_mask, cache, position_ids) -> list:
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

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own output head: final norm, then LM head."""
        return self.model.lm_head(self.norm(hidden))

    def missing(self) -> list[str]:
        """The parts this adapter reads that the model lacks (empty: it fits)."""
        inner = getattr(self.model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        gone = [p for p in parts if not hasattr(inner, p)]
        return gone + ([] if hasattr(self.model, "lm_head") else ["lm_head"])


REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: `cls` adapts models whose decoder layers are of its `layer_classes`."""
    for name in cls.layer_classes:
        REGISTRY[name] = cls
    return cls


def layer_class(model: nn.Module) -> str | None:
    """The name of the model's decoder-layer class, seen through FSDP2 (bts.distributed), which
    swaps a block's class for a generated subclass named FSDP<name> (bases: FSDPModule, it)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return None
    cls = type(layers[0])
    wrapped = cls.__bases__[-1]
    return wrapped.__name__ if cls.__name__ == f"FSDP{wrapped.__name__}" else cls.__name__


def adapter(model: nn.Module, role: str) -> Adapter:
    """The adapter for `model`, or one line naming the model and the families supported."""
    kind = layer_class(model)
    cls = REGISTRY.get(kind)
    found = cls(model) if cls is not None else None
    if found is None or found.missing():
        what = f"decoder layer {kind}" if cls is None else f"missing {', '.join(found.missing())}"
        raise BtsError(
            f"{role} ({type(model).__name__}) does not have the Llama layout or another that "
            f"bts has an adapter for ({what}): use a {supported()} causal LM, or add an "
            "adapter in bts/arch/"
        )
    return found


def supported() -> str:
    """The families with an adapter, for messages."""
    names = sorted({n.removesuffix("DecoderLayer") for n in REGISTRY})
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def stack_groups(models: Sequence[nn.Module]) -> dict | None:
    """The batched kernels' grouping shared by all `models`, or None if any lacks one."""
    groups = [adapter(m, "constituent").stack_groups for m in models]
    return groups[0] if all(g is not None and g is groups[0] for g in groups) else None
