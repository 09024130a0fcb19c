"""Branch-Train-MiX (arXiv 2403.07816): upcycle a seed and its experts into one Mixtral MoE.

Per transformer block, each constituent's feed-forward block (gate/up/down projections) becomes
one expert of a top-k routed MoE layer; every other weight (embeddings, attention, norms, LM
head) is the mean over the constituents. The result is a `MixtralForCausalLM` (saved as a plain
Mixtral checkpoint), so the project's training loop fine-tunes it like any causal LM; in training
mode its `.loss` includes the router's load-balancing loss (alpha = `aux_loss_coef`). See
docs/btx.md for the choices made here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from bts.baselines import check_family
from bts.errors import BtsError
from bts.fileio import atomic_dir

SEED_EXPERT = "seed"


class BTXForCausalLM(MixtralForCausalLM):
    """Mixtral whose router logits, hence the load-balancing loss, are on exactly in training mode.

    Off in eval mode because transformers 5.23's Mixtral cannot generate with an attention mask
    while router logits are on (cached steps route only the new tokens but the mask spans the
    whole sequence: transformers issue #30731), and an evaluation loss should be the LM loss
    alone. An explicit `output_router_logits=` argument still wins.
    """

    def forward(self, *args, output_router_logits: bool | None = None, **kwargs):
        if output_router_logits is None:
            output_router_logits = self.training
        return super().forward(*args, output_router_logits=output_router_logits, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save a plain Mixtral checkpoint that any Mixtral loader reads."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = ["MixtralForCausalLM"]
        self.config.save_pretrained(save_directory)


def load_btx(path: Path) -> BTXForCausalLM:
    """Reload a saved BTX model with its training-mode load-balancing loss."""
    return BTXForCausalLM.from_pretrained(path)


class BTXSpec(BaseModel, extra="forbid"):
    """How to build (and, for the training loop, what to train in) the BTX model."""

    num_experts_per_tok: int = Field(2, ge=1)  # BTX: top-2 routing
    include_seed: bool = True  # the seed's FFN joins as a generalist expert (BTX main setup)
    train_all: bool = True  # BTX fine-tunes every weight; False trains the routers only
    aux_loss_coef: float = Field(0.01, ge=0.0)  # BTX: load-balancing alpha = 0.01
    router_init_std: float = Field(0.02, ge=0.0)  # Mixtral's init; 0 gives all-zero routers
    router_seed: int = 0


def btx_config(seed: LlamaConfig, spec: BTXSpec, expert_names: list[str]) -> MixtralConfig:
    """A Mixtral config equal to the seed's Llama config except for the routed MLPs."""
    return MixtralConfig(
        vocab_size=seed.vocab_size,
        hidden_size=seed.hidden_size,
        intermediate_size=seed.intermediate_size,
        num_hidden_layers=seed.num_hidden_layers,
        num_attention_heads=seed.num_attention_heads,
        num_key_value_heads=seed.num_key_value_heads,
        head_dim=seed.head_dim,
        hidden_act=seed.hidden_act,
        max_position_embeddings=seed.max_position_embeddings,
        initializer_range=seed.initializer_range,
        rms_norm_eps=seed.rms_norm_eps,
        pad_token_id=seed.pad_token_id,
        bos_token_id=seed.bos_token_id,
        eos_token_id=seed.eos_token_id,
        tie_word_embeddings=seed.tie_word_embeddings,
        rope_parameters=dict(seed.rope_parameters),
        attention_dropout=seed.attention_dropout,
        sliding_window=None,
        num_local_experts=len(expert_names),
        num_experts_per_tok=spec.num_experts_per_tok,
        output_router_logits=False,  # BTXForCausalLM turns them on in training mode
        router_aux_loss_coef=spec.aux_loss_coef,
        router_jitter_noise=0.0,
        btx_experts=expert_names,  # expert index -> constituent, for routing analysis
    )


def build_btx(
    spec: BTXSpec,
    seed_dir: Path,
    expert_dirs: Mapping[str, Path],
    out_dir: Path | None = None,
    *,
    overwrite: bool = False,
) -> BTXForCausalLM:
    """The BTX model (float32, eval mode) built from the seed and its experts.

    Expert order: the seed first (if `spec.include_seed`), then `expert_dirs` in order. If
    `out_dir` is given, the model, the seed's tokenizer and `btx_spec.json` are saved there
    atomically.
    """
    seed_config = check_family(Path(seed_dir), expert_dirs)
    _check_llama(seed_config)
    if spec.include_seed and SEED_EXPERT in expert_dirs:
        raise BtsError(f"an expert is named {SEED_EXPERT!r}: rename it, that name is the seed's")
    sources = {SEED_EXPERT: Path(seed_dir)} if spec.include_seed else {}
    sources |= {name: Path(path) for name, path in expert_dirs.items()}
    if spec.num_experts_per_tok > len(sources):
        raise BtsError(
            f"num_experts_per_tok={spec.num_experts_per_tok} exceeds the {len(sources)} experts: "
            "lower it or add experts"
        )
    with torch.random.fork_rng():  # the constructor's random init must not move the caller's RNG
        model = BTXForCausalLM(btx_config(seed_config, spec, list(sources))).eval()
    _fill_from_constituents(model, list(sources.values()))
    _init_routers(model, spec.router_init_std, spec.router_seed)
    if out_dir is not None:
        save_btx(model, spec, Path(seed_dir), Path(out_dir), overwrite=overwrite)
    return model


def _check_llama(config) -> None:
    """Refuse constituents whose blocks Mixtral's blocks cannot reproduce exactly."""
    if config.model_type != "llama":
        raise BtsError(
            f"BTX here upcycles Llama-layout models, got model_type={config.model_type!r}: "
            "use Llama checkpoints"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise BtsError(f"the seed has {flag}=True, which Mixtral lacks: use a model without it")


@torch.no_grad()
def _fill_from_constituents(model: MixtralForCausalLM, paths: list[Path]) -> None:
    """Expert e's FFN comes from constituent e; all other weights are the constituents' mean."""
    shared = {
        name: param for name, param in model.named_parameters() if ".mlp." not in name
    }  # named_parameters lists a tied LM head once, so it is averaged once
    for param in shared.values():
        param.zero_()
    for index, path in enumerate(paths):
        dense = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        dense_shared = {n: p for n, p in dense.named_parameters() if ".mlp." not in n}
        if dense_shared.keys() != shared.keys():
            raise BtsError(f"{path} does not have the Llama parameter layout: use a Llama model")
        for name, param in shared.items():
            param.add_(dense_shared[name])
        for block, dense_block in zip(model.model.layers, dense.model.layers, strict=True):
            _set_expert(block.mlp.experts, index, dense_block.mlp)
        del dense
    for param in shared.values():
        param.div_(len(paths))


def _set_expert(experts, index: int, mlp) -> None:
    """Copy a Llama MLP into slot `index` of Mixtral's fused expert tensors.

    Mixtral computes act(x W_gate^T) * (x W_up^T) from `gate_up_proj[e] = [W_gate; W_up]` (gate
    rows first) and then `down_proj[e]`, the same function as Llama's MLP.
    """
    experts.gate_up_proj[index].copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    experts.down_proj[index].copy_(mlp.down_proj.weight)


@torch.no_grad()
def _init_routers(model: MixtralForCausalLM, std: float, seed: int) -> None:
    """Gaussian router weights from their own generator, so builds are reproducible."""
    generator = torch.Generator().manual_seed(seed)
    for router in routers(model):
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * std)


def routers(model: MixtralForCausalLM) -> list[MixtralTopKRouter]:
    """The per-block routers, in block order."""
    return [module for module in model.modules() if isinstance(module, MixtralTopKRouter)]


def set_btx_trainable(model: MixtralForCausalLM, train_all: bool) -> int:
    """Train every weight (BTX) or only the routers; returns the number of trainable parameters."""
    model.requires_grad_(train_all)
    for router in routers(model):
        router.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_btx(
    model: MixtralForCausalLM, spec: BTXSpec, seed_dir: Path, out_dir: Path, overwrite: bool = False
) -> Path:
    """Save model, the seed's tokenizer and the spec into `out_dir`, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "btx_spec.json").write_text(spec.model_dump_json(indent=2) + "\n")
    return Path(out_dir)
