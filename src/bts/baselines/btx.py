"""Branch-Train-MiX (arXiv 2403.07816): upcycle a seed and its experts into one Mixtral MoE.

Per transformer block, each constituent's feed-forward block (gate/up/down projections) becomes
one expert of a routed MoE layer; every other weight (embeddings, attention, norms, LM head) is
the mean over the constituents. The result is a `MixtralForCausalLM` (saved as a plain Mixtral
checkpoint), so the project's training loop fine-tunes it like any causal LM; in training mode
its `.loss` includes the router's load-balancing loss (alpha = `aux_loss_coef`).

Routing variants (`BTXSpec.routing`, stored as `config.btx_routing`): `top2` (the BTX paper:
top-k, k = `num_experts_per_tok`, with the load-balancing loss), `soft` (every expert, weighted
by the router's softmax; the BTS paper's BTX-soft) and `top1` (one expert per token, sampled by
Gumbel-softmax with a straight-through gradient in training, the argmax in evaluation; the BTS
paper's BTX-sample). See docs/btx.md for the choices made here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter

from bts.baselines import check_family
from bts.baselines.registry import Hooks
from bts.baselines.specs import BTXSpec  # re-exported beside the model it builds
from bts.errors import BtsError
from bts.fileio import atomic_dir

SEED_EXPERT = "seed"


class SoftRouter(MixtralTopKRouter):
    """Every expert on every token, weighted by the router's softmax (no top-k, no renormalising).

    Returns all expert indices, so Mixtral's experts run densely: soft routing costs all experts.
    """

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        indices = torch.arange(self.num_experts, device=logits.device).expand(len(logits), -1)
        return logits, probs, indices


class GumbelTop1Router(MixtralTopKRouter):
    """One expert per token: a Gumbel-softmax sample in training, the argmax in evaluation.

    Training uses the straight-through estimator restricted to the chosen expert: its weight is
    exactly 1 in the forward pass (the hard one-hot sample) while the gradient flows through its
    soft Gumbel probability, hence to every router logit. The full estimator would also need the
    other experts' outputs, i.e. running all of them; we keep the compute of one expert.
    """

    def __init__(self, config):
        super().__init__(config)
        self.temperature = float(getattr(config, "btx_gumbel_temperature", 1.0))

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        if not self.training:
            index = logits.argmax(dim=-1, keepdim=True)
            return logits, torch.ones(index.shape, device=logits.device), index
        noise = torch.empty_like(logits, dtype=torch.float32).exponential_()
        gumbel = -noise.clamp_min(torch.finfo(torch.float32).tiny).log()  # a 0 draw would give inf
        soft = torch.softmax((logits.float() + gumbel) / self.temperature, dim=-1)
        index = soft.argmax(dim=-1, keepdim=True)  # a sample from softmax(logits), any temperature
        chosen = soft.gather(-1, index)
        return logits, 1.0 + (chosen - chosen.detach()), index  # value exactly 1, soft gradient


class DenseExperts(MixtralExperts):
    """Every FFN expert on every token as three batched matmuls, for soft routing.

    Mixtral's expert kernels gather the tokens of each expert, which for soft routing (every
    token to every expert) costs several times a dense computation of the same function.
    """

    def forward(self, hidden_states, top_k_index, top_k_weights):
        gate, up = torch.einsum("td,efd->etf", hidden_states, self.gate_up_proj).chunk(2, dim=-1)
        outputs = torch.einsum("eti,edi->etd", self.act_fn(gate) * up, self.down_proj)
        weights = torch.zeros(
            len(hidden_states), self.num_experts, dtype=outputs.dtype, device=outputs.device
        ).scatter(1, top_k_index, top_k_weights.to(outputs.dtype))
        return torch.einsum("etd,te->td", outputs, weights)


ROUTERS: dict[str, type[MixtralTopKRouter]] = {
    "top2": MixtralTopKRouter,
    "soft": SoftRouter,
    "top1": GumbelTop1Router,
}


def install_routers(model: MixtralForCausalLM) -> None:
    """Give every block the router class of `config.btx_routing`, keeping the router weights."""
    router_class = ROUTERS[routing_of(model.config)]
    for layer in model.model.layers:
        old = layer.mlp.gate
        if type(old) is not router_class:
            new = router_class(model.config)
            new.weight = old.weight  # already initialised (or about to be loaded) by transformers
            layer.mlp.gate = new
        if router_class is SoftRouter and type(layer.mlp.experts) is not DenseExperts:
            dense = DenseExperts(model.config)
            dense.gate_up_proj, dense.down_proj = (
                layer.mlp.experts.gate_up_proj,
                layer.mlp.experts.down_proj,
            )
            layer.mlp.experts = dense


def routing_of(config) -> str:
    """The routing variant a config asks for; checkpoints from before variants are top-k."""
    routing = getattr(config, "btx_routing", "top2")
    if routing not in ROUTERS:
        raise BtsError(f"unknown btx_routing {routing!r} in the config: use one of {list(ROUTERS)}")
    return routing


class BTXForCausalLM(MixtralForCausalLM):
    """Mixtral with the routing variant of `config.btx_routing`, whose router logits, hence the
    load-balancing loss, are on exactly in training mode (and never for soft routing).

    Off in eval mode because transformers 5.23's Mixtral cannot generate with an attention mask
    while router logits are on (cached steps route only the new tokens but the mask spans the
    whole sequence: transformers issue #30731), and an evaluation loss should be the LM loss
    alone. Off for soft routing because there every expert gets every token, so the Switch loss
    is the constant `num_experts` and only shifts the reported loss. An explicit
    `output_router_logits=` argument still wins.
    """

    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        install_routers(self)

    def forward(self, *args, output_router_logits: bool | None = None, **kwargs):
        if output_router_logits is None:
            output_router_logits = self.training and routing_of(self.config) != "soft"
        return super().forward(*args, output_router_logits=output_router_logits, **kwargs)

    def active_parameters(self) -> int:
        """Parameters a token uses (the report's params_active): see `active_parameters` below."""
        return active_parameters(self)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save a plain Mixtral checkpoint that any Mixtral loader reads (subclasses keep theirs)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.config.model_type == "mixtral":
            self.config.architectures = ["MixtralForCausalLM"]
            self.config.save_pretrained(save_directory)


def load_btx(path: Path) -> BTXForCausalLM:
    """Reload a saved BTX model with its routing variant and training-mode load-balancing loss."""
    return BTXForCausalLM.from_pretrained(path)


def experts_per_token(routing: str, num_experts_per_tok: int, num_experts: int) -> int:
    """How many FFN experts each token runs through under a routing variant."""
    return {"top2": num_experts_per_tok, "soft": num_experts, "top1": 1}[routing]


def btx_config(seed: LlamaConfig, spec: BTXSpec, expert_names: list[str]) -> MixtralConfig:
    """A Mixtral config equal to the seed's Llama config except for the routed MLPs."""
    return MixtralConfig(**mixtral_kwargs(seed, spec.routing, spec, expert_names))


def mixtral_kwargs(seed: LlamaConfig, routing: str, spec, expert_names: list[str]) -> dict:
    """Mixtral config fields for the seed's shapes and a routing variant (BTX and BAM share them).

    `num_experts_per_tok` is the number of experts a token actually uses (1 for top1, all for
    soft), so a plain `MixtralForCausalLM` reload evaluates every variant exactly as we do:
    top-1 with renormalised weight 1 is our argmax, top-all renormalised is the softmax.
    """
    return dict(
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
        num_experts_per_tok=experts_per_token(routing, spec.num_experts_per_tok, len(expert_names)),
        output_router_logits=False,  # BTXForCausalLM turns them on in training mode
        router_aux_loss_coef=spec.aux_loss_coef,
        router_jitter_noise=0.0,
        btx_routing=routing,
        btx_gumbel_temperature=spec.gumbel_temperature,
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
    seed_config, sources = constituents(spec, spec.routing, seed_dir, expert_dirs)
    with torch.random.fork_rng():  # the constructor's random init must not move the caller's RNG
        model = BTXForCausalLM(btx_config(seed_config, spec, list(sources))).eval()
    fill_from_constituents(model, list(sources.values()))
    init_routers(routers(model), spec.router_init_std, spec.router_seed)
    if out_dir is not None:
        save_btx(model, spec, Path(seed_dir), Path(out_dir), overwrite=overwrite)
    return model


def constituents(spec, routing: str, seed_dir: Path, expert_dirs: Mapping[str, Path]):
    """The seed's config and the constituents in expert order, after every input check."""
    seed_config = check_family(Path(seed_dir), expert_dirs)
    _check_llama(seed_config)
    if spec.include_seed and SEED_EXPERT in expert_dirs:
        raise BtsError(f"an expert is named {SEED_EXPERT!r}: rename it, that name is the seed's")
    sources = {SEED_EXPERT: Path(seed_dir)} if spec.include_seed else {}
    sources |= {name: Path(path) for name, path in expert_dirs.items()}
    if routing == "top2" and spec.num_experts_per_tok > len(sources):
        raise BtsError(
            f"num_experts_per_tok={spec.num_experts_per_tok} exceeds the {len(sources)} experts: "
            "lower it or add experts"
        )
    return seed_config, sources


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


def copy_ffn_expert(block, index: int, dense_block) -> None:
    """BTX's per-block copy: constituent `index`'s MLP into expert slot `index`."""
    _set_expert(block.mlp.experts, index, dense_block.mlp)


@torch.no_grad()
def fill_from_constituents(
    model: MixtralForCausalLM,
    paths: list[Path],
    routed: tuple[str, ...] = (".mlp.",),
    copy_experts: Callable = copy_ffn_expert,
) -> None:
    """Expert e's routed modules come from constituent e; all other weights are the mean.

    `routed` names the parameter-name fragments that are per-expert (BTX: the MLPs; BAM adds
    attention) and `copy_experts(block, e, dense_block)` copies them for one block.
    """

    def is_shared(name: str) -> bool:
        return not any(fragment in name for fragment in routed)

    # named_parameters lists a tied LM head once, so it is averaged once
    shared = {name: param for name, param in model.named_parameters() if is_shared(name)}
    for param in shared.values():
        param.zero_()
    for index, path in enumerate(paths):
        dense = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        dense_shared = {n: p for n, p in dense.named_parameters() if is_shared(n)}
        if dense_shared.keys() != shared.keys():
            raise BtsError(f"{path} does not have the Llama parameter layout: use a Llama model")
        for name, param in shared.items():
            param.add_(dense_shared[name])
        for block, dense_block in zip(model.model.layers, dense.model.layers, strict=True):
            copy_experts(block, index, dense_block)
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
def init_routers(modules: list[nn.Module], std: float, seed: int) -> None:
    """Gaussian router weights from their own generator, so builds are reproducible."""
    generator = torch.Generator().manual_seed(seed)
    for router in modules:
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * std)


def routers(model: MixtralForCausalLM) -> list[MixtralTopKRouter]:
    """The per-block FFN routers, in block order."""
    return [module for module in model.modules() if isinstance(module, MixtralTopKRouter)]


def set_btx_trainable(model: MixtralForCausalLM, train_all: bool) -> int:
    """Train every weight (BTX) or only the routers; returns the number of trainable parameters."""
    model.requires_grad_(train_all)
    for router in routers(model):
        router.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def active_parameters(model: MixtralForCausalLM) -> int:
    """Parameters a token uses: everything except the FFN experts it is not routed to.

    Per block a token runs `config.num_experts_per_tok` FFN experts (1 for top1, all for soft);
    all shared weights (embeddings, attention, norms, routers, a tied head once) count fully,
    as do BAM's attention experts, which are soft-routed.
    """
    active = sum(p.numel() for p in model.parameters())
    used = model.config.num_experts_per_tok
    for layer in model.model.layers:
        experts = layer.mlp.experts
        per_expert = (
            experts.gate_up_proj.numel() + experts.down_proj.numel()
        ) // experts.num_experts
        active -= (experts.num_experts - used) * per_expert
    return active


def save_btx(
    model: MixtralForCausalLM, spec: BTXSpec, seed_dir: Path, out_dir: Path, overwrite: bool = False
) -> Path:
    """Save model, the seed's tokenizer and the spec into `out_dir`, atomically."""
    return save_with_spec(model, spec, "btx_spec.json", seed_dir, out_dir, overwrite)


def save_with_spec(
    model, spec: BaseModel, spec_name: str, seed_dir: Path, out_dir: Path, overwrite: bool
) -> Path:
    """Save model, the seed's tokenizer and the spec (as `spec_name`) into `out_dir`, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    with atomic_dir(out_dir, "model", overwrite=overwrite, inputs={"the seed": seed_dir}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / spec_name).write_text(spec.model_dump_json(indent=2) + "\n")
    return Path(out_dir)


def _trainable(model: MixtralForCausalLM, spec: BTXSpec) -> None:
    set_btx_trainable(model, spec.train_all)


HOOKS = Hooks(build=build_btx, load=load_btx, trainable=_trainable)
