"""Branch-Attend-Mix (BAM, arXiv 2408.08274): BTX whose attention is a mixture of experts too.

Per transformer block, each constituent's feed-forward block becomes one routed FFN expert, as in
BTX (`bts.baselines.btx`, any of its routing variants), and each constituent's attention module
(q/k/v/o projections) becomes one attention expert: a per-block router gives softmax weights over
all attention experts per token, and the block's attention output is the weighted sum of every
expert's output (BAM's soft mixture of attention). Embeddings, norms and the LM head are the
constituents' mean. Each attention expert keeps its own KV cache, so `generate` works.

BAM with adapters (the BTS paper's Sec. 3.3, `BAMSpec.adapters`): every constituent frozen, a
d x d adapter (identity at the start, no bias) on each attention expert's and each FFN expert's
output; only the routers and the adapters train.

The model is a Mixtral subclass with its own `model_type` (`bts_bam`), registered with the Auto
classes when this module is imported, saved with `save_pretrained` (safetensors). See docs/bam.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralAttention

from bts.baselines.btx import (
    BTXForCausalLM,
    active_parameters,
    constituents,
    copy_ffn_expert,
    fill_from_constituents,
    init_routers,
    mixtral_kwargs,
    routers,
    save_with_spec,
)
from bts.baselines.registry import Hooks
from bts.baselines.specs import BAMSpec
from bts.errors import BtsError

__all__ = [
    "BAMConfig",
    "BAMForCausalLM",
    "BAMSpec",
    "active_parameters",
    "attention_routers",
    "build_bam",
    "load_bam",
    "output_adapters",
    "set_bam_trainable",
]


class BAMConfig(MixtralConfig):
    """Mixtral's config plus the number of attention experts per block and whether every
    attention and FFN expert has an output adapter (BAM with adapters)."""

    model_type = "bts_bam"
    bam_attention_experts: int = 1
    bam_adapters: bool = False


class Adapters(nn.Module):
    """One d x d output adapter per expert, `weight[e]` (no bias), identity at initialisation so
    that adding them leaves the model's function unchanged."""

    def __init__(self, n_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(identities(n_experts, hidden_size))


def identities(n: int, d: int) -> torch.Tensor:
    """n stacked d x d identity matrices."""
    return torch.eye(d).repeat(n, 1, 1)


class AttentionRouter(nn.Module):
    """Softmax weights over a block's attention experts, per token.

    Not a `MixtralTopKRouter`, so its logits stay out of Mixtral's load-balancing loss: every
    attention expert sees every token, there is no load to balance.
    """

    def __init__(self, config: BAMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.bam_attention_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.softmax(F.linear(hidden_states, self.weight).float(), dim=-1)


class MixtureOfAttention(nn.Module):
    """A block's attention experts, each a full Mixtral attention, mixed by a soft router.

    Expert e of block b caches its keys and values as cache layer `b * n_experts + e`, so one
    `DynamicCache` holds every expert's cache (BAMForCausalLM makes it grow on demand).
    """

    def __init__(self, config: BAMConfig, block_idx: int):
        super().__init__()
        n = config.bam_attention_experts
        self.router = AttentionRouter(config)
        self.experts = nn.ModuleList(
            MixtralAttention(config, layer_idx=block_idx * n + e) for e in range(n)
        )
        self.adapters = Adapters(n, config.hidden_size) if config.bam_adapters else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        weights = self.router(hidden_states)  # (batch, seq, n_experts), sums to one per token
        mixed = None
        for e, expert in enumerate(self.experts):
            out, _ = expert(
                hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
            )
            if self.adapters is not None:
                out = F.linear(out, self.adapters.weight[e])
            term = weights[..., e : e + 1].to(out.dtype) * out
            mixed = term if mixed is None else mixed + term
        return mixed, None  # per-expert attention maps are not returned


class AdaptedMoE(nn.Module):
    """A block's FFN mixture (Mixtral's router and experts) with an adapter on each expert's output.

    A_e (W_down,e h) = (A_e W_down,e) h: the adapters fold into the experts' down projections for
    the call, so Mixtral's expert kernels (sparse top-k or `DenseExperts`) run unchanged, and
    with identity adapters the folded weights, hence the outputs, are exactly the plain ones.
    Parameter names stay Mixtral's (`mlp.gate`, `mlp.experts`) plus `mlp.adapters`.
    """

    def __init__(self, moe: nn.Module, config: BAMConfig):
        super().__init__()
        self.gate, self.experts = moe.gate, moe.experts
        self.adapters = Adapters(config.num_local_experts, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # no router jitter: BTX and BAM configs set router_jitter_noise=0
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, top_k_weights, top_k_index = self.gate(flat)
        down = torch.matmul(self.adapters.weight, self.experts.down_proj)
        out = functional_call(self.experts, {"down_proj": down}, (flat, top_k_index, top_k_weights))
        return out.reshape(hidden_states.shape)


class BAMForCausalLM(BTXForCausalLM):
    """BTX's MoE model (routing variant of `config.btx_routing`) with soft attention mixtures,
    and output adapters on every expert if `config.bam_adapters`."""

    config_class = BAMConfig

    def __init__(self, config: BAMConfig):
        super().__init__(config)
        for block_idx, layer in enumerate(self.model.layers):
            layer.self_attn = MixtureOfAttention(config, block_idx)
            nn.init.normal_(layer.self_attn.router.weight, std=config.initializer_range)
            if config.bam_adapters:
                layer.mlp = AdaptedMoE(layer.mlp, config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AttentionRouter):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, Adapters):
            module.weight.copy_(identities(*module.weight.shape[:2]))

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        **kwargs,
    ):
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()  # Mixtral's own would size it to one layer per block
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate's default cache has one layer per block; ours needs one per attention expert."""
        no_cache = model_kwargs.get("past_key_values") is None
        if no_cache and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise BtsError(
                    f"BAM supports only the dynamic KV cache, not "
                    f"{generation_config.cache_implementation!r}: drop cache_implementation"
                )
            model_kwargs["past_key_values"] = DynamicCache()  # grows to blocks x experts layers
            return
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, *args, **kwargs
        )


AutoConfig.register(BAMConfig.model_type, BAMConfig, exist_ok=True)
AutoModelForCausalLM.register(BAMConfig, BAMForCausalLM, exist_ok=True)


def build_bam(
    spec: BAMSpec,
    seed_dir: Path,
    expert_dirs: Mapping[str, Path],
    out_dir: Path | None = None,
    *,
    overwrite: bool = False,
) -> BAMForCausalLM:
    """The BAM model (float32, eval mode) built from the seed and its experts.

    Expert order (attention and FFN alike): the seed first (if `spec.include_seed`), then
    `expert_dirs` in order. If `out_dir` is given, the model, the seed's tokenizer and
    `bam_spec.json` are saved there atomically.
    """
    seed_config, sources = constituents(spec, spec.ffn_routing, seed_dir, expert_dirs)
    names = list(sources)
    config = BAMConfig(
        **mixtral_kwargs(seed_config, spec.ffn_routing, spec, names),
        bam_attention_experts=len(names),
        bam_adapters=spec.adapters,
    )
    with torch.random.fork_rng():  # the constructor's random init must not move the caller's RNG
        model = BAMForCausalLM(config).eval()
    fill_from_constituents(
        model, list(sources.values()), routed=(".mlp.", ".self_attn."), copy_experts=_copy_experts
    )
    init_routers(routers(model) + attention_routers(model), spec.router_init_std, spec.router_seed)
    if out_dir is not None:
        save_with_spec(model, spec, "bam_spec.json", Path(seed_dir), Path(out_dir), overwrite)
    return model


def _copy_experts(block, index: int, dense_block) -> None:
    """Constituent `index`'s MLP into FFN slot `index`, its attention into attention expert `index`."""
    copy_ffn_expert(block, index, dense_block)
    block.self_attn.experts[index].load_state_dict(dense_block.self_attn.state_dict())


def attention_routers(model: nn.Module) -> list[AttentionRouter]:
    """The per-block attention routers, in block order."""
    return [module for module in model.modules() if isinstance(module, AttentionRouter)]


def output_adapters(model: nn.Module) -> list[Adapters]:
    """The output adapters (attention and FFN, block by block); none unless `bam_adapters`."""
    return [module for module in model.modules() if isinstance(module, Adapters)]


def set_bam_trainable(model: BAMForCausalLM, train_all: bool) -> int:
    """Train every weight (BAM), only the FFN and attention routers, or, for BAM with adapters,
    the routers and the adapters; returns the trainable count."""
    extra = output_adapters(model)
    if extra and train_all:
        raise BtsError(
            "BAM with adapters trains only its routers and adapters: pass train_all=False"
        )
    model.requires_grad_(train_all)
    for module in routers(model) + attention_routers(model) + extra:
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_bam(path: Path) -> BAMForCausalLM:
    """Reload a saved BAM model (safetensors) with its FFN routing variant."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BtsError(f"{path} has no config.json: give a directory saved by build_bam")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != BAMConfig.model_type:
        raise BtsError(f"{path} holds a {model_type!r} model, not BAM: give a BAM directory")
    return BAMForCausalLM.from_pretrained(path)


def _trainable(model: BAMForCausalLM, spec: BAMSpec) -> None:
    set_bam_trainable(model, spec.train_all)


HOOKS = Hooks(build=build_bam, load=load_bam, trainable=_trainable)
