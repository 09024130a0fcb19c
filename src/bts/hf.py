"""A stitched model as an ordinary Hugging Face causal LM (what `bts export` writes and loads).

`BtsStitchedForCausalLM` wraps a `bts.StitchedModel` and delegates forward to it, so an export and
the in-memory model compute the same logits. Its config holds the placement and each
constituent's own config; its weights hold hub, experts and stitch layers in one safetensors file.

`save_pretrained` copies this file next to the weights (`register_for_auto_class`), so an export
also loads with `trust_remote_code=True` on a machine where `bts` is installed but not imported:
this file imports `bts`, which does the actual work. After `import bts` the classes are
registered with the Auto classes and no remote code is needed.

Generation: transformers' `generate` expects one `Cache`; a stitched model needs one KV cache per
constituent. `StitchedCache` holds them and answers the questions `generate` asks (length,
cropping) from the hub's; the forward pass swaps the empty `DynamicCache` that `generate` creates
for one.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from bts.generation import crop_cache
from bts.models import HUB
from bts.spec import StitchPoint, StitchSpec
from bts.stitch import StitchedModel

MODEL_TYPE = "bts_stitched"
# what generate(), pipelines and lm-eval read from a causal LM's config; copied from the hub's
_TEXT_ATTRIBUTES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


class BtsStitchedConfig(PretrainedConfig):
    """Placement, gate settings and every constituent's config (as dicts, by name)."""

    model_type = MODEL_TYPE

    hub_config: dict | None = None
    expert_configs: dict | None = None
    # the stitching order (config.json sorts keys, and the order of the experts fixes the order
    # of the gates' sums, so a sorted order would change the logits' rounding); None: sorted
    expert_order: list | None = None
    placement: list | None = None
    gate_dropout: float = 0.1
    gate_gain: float = 1.0
    gate_input: str = "rms"
    gate_bias: bool = True
    expert_stream: str = "keep"
    output: str = "hub"
    output_mix: str = "prob"
    output_evidence: bool = True
    init: str = "identity"
    init_seed: int = 0
    expert_dropout: float = 0.0
    depth_maps: dict | None = None  # explicit per-expert depth maps (bts.spec.StitchSpec)
    use_cache: bool = True
    # the hub's head is tied or not inside the hub; the wrapper itself ties nothing
    tie_word_embeddings: bool = False
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self.hub_config = self.hub_config or {}
        self.expert_configs = self.expert_configs or {}
        self.placement = [list(p) for p in (self.placement or [])]
        if self.hub_config:
            hub = self.constituent_config(HUB)
            for name in _TEXT_ATTRIBUTES:
                setattr(self, name, getattr(hub, name, None))
        super().__post_init__(**kwargs)

    def constituent_config(self, name: str) -> PretrainedConfig:
        """The config of the hub (`"hub"`) or of one expert, as its own config class."""
        entry = dict(self.hub_config if name == HUB else self.expert_configs[name])
        return AutoConfig.for_model(entry.pop("model_type"), **entry)


class StitchedCache(Cache):
    """The KV cache(s) of a stitched model behind the one `Cache` that `generate` handles.

    `inner` is whatever `StitchedModel.new_cache()` returns (one `DynamicCache` per constituent,
    or one stacked cache for all of them) and is passed back to it unchanged. Every constituent
    sees the same tokens, so the length is the hub's.
    """

    def __init__(self, inner):
        super().__init__(layers=[])
        self.inner = inner

    def __repr__(self) -> str:
        return f"StitchedCache({type(self.inner).__name__}, length={self.get_seq_length()})"

    def __bool__(self) -> bool:
        # Cache.__len__ counts `layers`, which we leave empty: never let that make us falsy
        return True

    def _parts(self) -> list:
        return list(self.inner.values()) if isinstance(self.inner, dict) else [self.inner]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        hub = self.inner[HUB] if isinstance(self.inner, dict) else self.inner
        return hub.get_seq_length(layer_idx)

    @property
    def is_compileable(self) -> bool:
        # generate() would otherwise build 4D masks for a static cache; ours grows dynamically
        return False

    @property
    def is_initialized(self) -> bool:
        return self.get_seq_length() > 0

    def _each(self, method: str, *args) -> None:
        for part in self._parts():
            if not hasattr(part, method):
                raise NotImplementedError(
                    f"the stitched model's {type(part).__name__} cannot {method}: beam search and "
                    "assisted decoding are not supported; use greedy or sampled generation"
                )
            getattr(part, method)(*args)

    def crop(self, max_length: int) -> None:
        length = max_length if max_length >= 0 else self.get_seq_length() + max_length
        crop_cache(self.inner, length)

    def reset(self) -> None:
        self._each("reset")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each("reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each("batch_select_indices", indices)


class BtsStitchedForCausalLM(PreTrainedModel, GenerationMixin):
    """A stitched model (hub, experts, stitch layers) with the transformers causal-LM interface."""

    config_class = BtsStitchedConfig
    base_model_prefix = "stitched"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = False

    def __init__(self, config: BtsStitchedConfig, stitched: StitchedModel | None = None):
        super().__init__(config)
        self.stitched = stitched if stitched is not None else _build(config)
        self.post_init()
        # post_init only collects tied weights from direct children; the hub and experts (whose
        # LM heads may be tied to their embeddings) sit one level down, inside `stitched`
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    @classmethod
    def from_stitched(cls, model: StitchedModel) -> BtsStitchedForCausalLM:
        """Wrap an in-memory stitched model (shares its modules, copies nothing)."""
        config = BtsStitchedConfig(
            hub_config=_config_dict(model.hub.config),
            expert_configs={n: _config_dict(m.config) for n, m in model.experts.items()},
            expert_order=model.expert_names,
            placement=[[p.after_layer, p.kind] for p in model.spec.placement],
            **model.spec.options(),
            dtype=next(model.parameters()).dtype,
        )
        wrapper = cls(config, stitched=model)
        hub_generation = getattr(model.hub, "generation_config", None)
        if hub_generation is not None:  # eos/pad/bos as the hub generates
            wrapper.generation_config = copy.deepcopy(hub_generation)
        return wrapper.eval()

    def init_weights(self):
        # Constituents arrive trained (export) or are loaded from the checkpoint, and stitch
        # layers initialise themselves (identity at step 0): randomising anything here would
        # destroy weights, so only tie.
        self.tie_weights(recompute_mapping=False)

    def get_input_embeddings(self):
        return self.stitched.hub.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        **_: object,  # position_ids, return_dict, ...: positions follow from the attention mask
    ) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("a stitched model takes input_ids, not inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = _stitched_cache(past_key_values, self.stitched) if use_cache else None
        out = self.stitched(
            input_ids,
            attention_mask=attention_mask,
            labels=labels,
            past_key_values=cache.inner if cache is not None else None,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        )
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=cache)


def _stitched_cache(past: Cache | None, model: StitchedModel) -> StitchedCache:
    """Our cache, for a new sequence (None, or the empty DynamicCache that generate() makes)."""
    if isinstance(past, StitchedCache):
        return past
    if past is None or past.get_seq_length() == 0:
        return StitchedCache(model.new_cache())
    raise ValueError(
        f"a stitched model cannot continue from a filled {type(past).__name__}: pass the "
        "StitchedCache that an earlier forward returned"
    )


def _config_dict(config: PretrainedConfig) -> dict:
    entry = config.to_dict()
    # rebuilt from model_type / not this checkpoint's: a local path would leak into the export
    for key in ("architectures", "_name_or_path", "transformers_version"):
        entry.pop(key, None)
    return entry


def _build(config: BtsStitchedConfig) -> StitchedModel:
    """Fresh constituents and stitch layers in the config's shape (weights come from the file)."""
    hub = AutoModelForCausalLM.from_config(config.constituent_config(HUB))
    experts = {
        name: AutoModelForCausalLM.from_config(config.constituent_config(name))
        for name in config.expert_order or config.expert_configs
    }
    placement = tuple(StitchPoint(int(after), kind) for after, kind in config.placement)
    options = {key: getattr(config, key) for key in StitchSpec().options()}
    return StitchedModel(hub, experts, StitchSpec(placement=placement, **options))


BtsStitchedConfig.register_for_auto_class()
BtsStitchedForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM load exports without remote code (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    AutoConfig.register(MODEL_TYPE, BtsStitchedConfig)
    AutoModelForCausalLM.register(BtsStitchedConfig, BtsStitchedForCausalLM)
