"""Gemma 2 and Gemma 3 (text): the Llama accessors fit, with three differences that live in the
model's own modules or here. Embeddings are scaled by sqrt(d) inside `embed_tokens` (transformers'
ScaledWordEmbedding), and the (1 + w) RMS norms and the extra pre/post-feedforward norms sit
inside each block, so `embed`, `block` and `norm` need nothing new. The head soft-caps its
logits (`final_logit_softcapping`), as the model's forward does after the LM head. Gemma 3's
local and global layers use rotary tables of different bases, one pair per attention kind.
The batched kernels cover neither, so Gemma constituents run the per-model loop."""

from __future__ import annotations

import torch

from bts.arch.base import Adapter, layer_types, register


@register
class Gemma2Adapter(Adapter):
    layer_classes = ("Gemma2DecoderLayer",)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head, then tanh soft-capping in the model's own order of operations."""
        logits = super().logits(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


@register
class Gemma3Adapter(Gemma2Adapter):
    layer_classes = ("Gemma3DecoderLayer",)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """The rotary tables per attention kind (local layers use another base than global)."""
        kinds = set(layer_types(self.model.config))
        return {kind: self.rotary_module(hidden, position_ids, kind) for kind in kinds}

    def block(self, index: int, hidden, positions, context: tuple, cache) -> torch.Tensor:
        masks, rotary = context
        kind = layer_types(self.model.config)[index]
        return super().block(index, hidden, positions, (masks, rotary[kind]), cache)
