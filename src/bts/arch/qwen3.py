"""Qwen3: the Llama layout (embed_tokens / layers / norm / rotary_emb / lm_head), with an RMS norm
on each head's queries and keys inside attention. The blocks run as the model's own; the batched
kernels do not cover the q/k norms, so Qwen3 constituents run the per-model loop."""

from __future__ import annotations

from bts.arch.base import Adapter, register


@register
class Qwen3Adapter(Adapter):
    layer_classes = ("Qwen3DecoderLayer",)
