"""The Llama layout: pre-norm RMSNorm blocks with rotary attention and a SwiGLU MLP, under
`model.embed_tokens / layers / norm / rotary_emb` and `lm_head`. Mistral and Qwen2 share it
(Qwen2 adds q/k/v biases, which the batched kernels stack too)."""

from __future__ import annotations

from bts.arch.base import Adapter, register


@register
class LlamaAdapter(Adapter):
    layer_classes = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
    stack_groups = {
        "norm1": [("input_layernorm", "weight")],
        "qkv": [
            ("self_attn.q_proj", "weight"),
            ("self_attn.k_proj", "weight"),
            ("self_attn.v_proj", "weight"),
        ],
        "qkv_bias": [
            ("self_attn.q_proj", "bias"),
            ("self_attn.k_proj", "bias"),
            ("self_attn.v_proj", "bias"),
        ],
        "o": [("self_attn.o_proj", "weight")],
        "o_bias": [("self_attn.o_proj", "bias")],
        "norm2": [("post_attention_layernorm", "weight")],
        "gate_up": [("mlp.gate_proj", "weight"), ("mlp.up_proj", "weight")],
        "gate_up_bias": [("mlp.gate_proj", "bias"), ("mlp.up_proj", "bias")],
        "down": [("mlp.down_proj", "weight")],
        "down_bias": [("mlp.down_proj", "bias")],
    }
