"""Batched constituents: the blocks of hub and experts run as one computation over stacked weights.

Experts branched from the hub have, at every depth, blocks of the hub's shapes (a set with an
expert of another width or depth runs the model's loop instead: `unstackable_reason`). Instead of N+1 small forwards per block (each with transformers' per-module overhead),
we keep each block's weights stacked along a leading model dimension and run one batched matmul
per projection (`torch.bmm`), one attention call over a (models x batch) batch, one norm.

Memory is not doubled: after a stack is built, each constituent's parameters are rebound to views
into it (`param.data = stack[i, ...]`), so the old tensors are freed and the constituents keep
working on their own (their forward, state_dict, SHA-256 and save_pretrained read the same bytes).
Stacks are built lazily, once, and checked cheaply before each forward (data pointers): anything
that replaced a constituent's tensors (`.to(dtype)`, `load_state_dict` with assign, ...) triggers a
rebuild instead of computing with stale weights.

Layout (M models at this depth, B rows, T new tokens, d width):
  hidden  [M, B, T, d]       index 0 is the hub, then the experts in stitching order
  qkv     [M, Hq*hd + 2*Hkv*hd, d]  q, k, v projections fused, nn.Linear layout
  gate_up [M, 2*I, d]        gate and up projections fused
  cache   [M, B, Hkv, S, hd] per layer, preallocated and grown by doubling

This module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.masking_utils import sdpa_mask

from bts.arch import adapter, config_value, layer_types, mismatch, stack_groups
from bts.errors import BtsError
from bts.models import HUB, position_ids

_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_FUSE_ROWS = 64  # rows (batch x new tokens) up to which fused projections are faster
_CHUNK_ROWS = 4096  # rows (models x batch x tokens) per MLP chunk
_CHUNK_TOKENS = 1536  # models x rows x tokens per chunk of a cache-less batched forward
def unstackable_reason(models: list[nn.Module], depth: int) -> str | None:
    """Why these constituents cannot run batched (None if they can). `models[0]` is the hub."""
    hub = models[0]
    first = next(hub.parameters())
    if len({id(m) for m in models}) != len(models):
        return "the same model object is stitched twice (its weights cannot view two stacks)"
    groups = stack_groups(models)
    if groups is None:
        kinds = sorted({type(adapter(m, "constituent").layers[0]).__name__ for m in models})
        return f"the batched kernels do not cover decoder layer {', '.join(kinds)}"
    hub_layer = adapter(hub, "the hub").layers[0]
    for i, model in enumerate(models):
        config = model.config
        reason = _config_reason(hub.config, config)
        if reason:
            return f"constituent {i}: {reason}"
        found = adapter(model, f"constituent {i}")
        layers = found.layers[: depth if i else None]
        if any(t != "full_attention" for t in layer_types(config)):
            return f"constituent {i}: sliding-window attention is not supported"
        params = [p for layer in layers for p in layer.parameters()]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            return f"constituent {i}: dtype or device differs from the hub's"
        for path, name in (part for parts in groups.values() for part in parts):
            want = getattr(hub_layer.get_submodule(path), name) is not None
            if any((getattr(layer.get_submodule(path), name) is not None) != want for layer in layers):
                return f"constituent {i}: {path} {name} differs from the hub's"
        rotary, hub_rotary = found.rotary_module, adapter(hub, "the hub").rotary_module
        if getattr(rotary, "attention_scaling", 1.0) != getattr(
            hub_rotary, "attention_scaling", 1.0
        ) or not torch.equal(rotary.inv_freq.cpu(), hub_rotary.inv_freq.cpu()):
            return f"constituent {i}: rotary embedding differs from the hub's"
    return None


def _depth_reason(model) -> str | None:
    """Why an expert cannot share the hub's stacks by depth: one stack per hub block needs every
    expert to be read after the hub's own block index at each stitch point, and to run as many
    blocks as the hub does alongside (None if all do)."""
    hub = model.block_stops(HUB)[:-1]
    for name, depth in model.expert_depths.items():
        if model.block_stops(name)[:-1] != hub or depth != model.expert_depth:
            return (
                f"expert '{name}' is read after blocks {list(model.depth_maps[name])} where the "
                f"hub's are {[stop - 1 for stop in hub]} (another depth)"
            )
    return None


def _config_reason(hub, config) -> str | None:
    found = mismatch(hub, config, "stack")
    if found is not None:
        return f"{found[0]} differs from the hub's"
    if getattr(config, "rope_parameters", None) != getattr(hub, "rope_parameters", None):
        return "rope parameters differ from the hub's"
    if config._attn_implementation not in _ATTN_IMPLEMENTATIONS:
        return f"attention implementation '{config._attn_implementation}' is not supported"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1 is not supported"
    return None


@dataclass
class StackedLayer:
    """One depth's weights for M constituents, stacked along dim 0 (nn.Linear layout)."""

    norm1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None

    @property
    def num_models(self) -> int:
        return self.qkv.shape[0]

    def subset(self, index: torch.Tensor) -> StackedLayer:
        """The stack restricted to some models (a copy: used once per pruned generate call)."""
        return StackedLayer(
            *(None if t is None else t.index_select(0, index) for t in self.__dict__.values())
        )

    def first(self, count: int) -> StackedLayer:
        """The first `count` models, as views (the hub alone is `first(1)`, no copy)."""
        return StackedLayer(*(None if t is None else t[:count] for t in self.__dict__.values()))


def _stack_group(layers: list[nn.Module], parts: list[tuple[str, str]]) -> tuple:
    """Concatenate `parts` along dim 0 per model, stack over models, rebind params to views."""
    params = [
        [getattr(layer.get_submodule(path), name) for path, name in parts] for layer in layers
    ]
    if params[0][0] is None:
        return None, []
    sizes = [p.shape[0] for p in params[0]]
    first = params[0][0]
    stack = torch.empty(
        (len(layers), sum(sizes), *first.shape[1:]), dtype=first.dtype, device=first.device
    )
    bound = []
    with torch.no_grad():
        for i, model_params in enumerate(params):
            for p, view in zip(model_params, stack[i].split(sizes), strict=True):
                view.copy_(p)
                p.data = view  # the constituent now reads the stack: no second copy in memory
                bound.append((p, view.data_ptr()))
    return stack, bound


class StackedWeights:
    """Every depth's stacked weights plus what is needed to check they are still bound."""

    def __init__(self, models: list[nn.Module], depth: int):
        self.num_layers = models[0].config.num_hidden_layers
        self.depth = depth
        self.layers: list[StackedLayer] = []
        self._bound: list[tuple[nn.Parameter, int]] = []
        layout = stack_groups(models)
        for index in range(self.num_layers):
            members = models if index < depth else models[:1]
            decoder_layers = [adapter(m, "constituent").layers[index] for m in members]
            groups = {}
            for key, parts in layout.items():
                stack, bound = _stack_group(decoder_layers, parts)
                groups[key] = stack
                self._bound.extend(bound)
            self.layers.append(StackedLayer(**groups))
        config = models[0].config
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config_value(config, "head_dim")
        self.act = ACT2FN[config.hidden_act]
        self.dtype = self.layers[0].qkv.dtype
        self._subset_key: tuple | None = None
        self._subset: list[StackedLayer] | None = None

    def is_current(self) -> bool:
        """True while every constituent parameter still points into the stacks."""
        return all(p.data_ptr() == ptr for p, ptr in self._bound)

    def unbind(self, model: nn.Module) -> None:
        """Give a constituent that leaves its own copy of the weights (it outlives the stack)."""
        ids = {id(p) for p in model.parameters()}
        with torch.no_grad():
            for p, _ in self._bound:
                if id(p) in ids:
                    p.data = p.data.clone()

    def layers_for(self, active: tuple[int, ...] | None) -> list[StackedLayer]:
        """The stacks for a subset of models (pruning), memoised for the last subset asked."""
        if active is None:
            return self.layers
        if self._subset_key != active:
            index = torch.tensor(active, device=self.layers[0].qkv.device)
            self._subset = [
                layer.subset(index) if i < self.depth else layer
                for i, layer in enumerate(self.layers)
            ]
            self._subset_key = active
        return self._subset


class StackedCache:
    """KV cache of the batched path: per layer, keys and values [M, B, Hkv, capacity, hd].

    Storage is preallocated and grown by doubling, so a decode step writes in place instead of
    concatenating the whole cache (what DynamicCache does). `crop` only moves the length.
    """

    def __init__(self):
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.lengths: list[int] = []
        self.models: tuple[int, ...] | None = None  # which constituents rows 0.. hold (pruning)

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer] if self.lengths else 0

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """Append [M, B, Hkv, T, hd] and return the keys and values so far (views)."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
            self.lengths.append(0)
        start, new = self.lengths[layer], key.shape[-2]
        if self.keys[layer] is None or start + new > self.keys[layer].shape[-2]:
            self._grow(layer, key, start + new)
        self.keys[layer][..., start : start + new, :] = key
        self.values[layer][..., start : start + new, :] = value
        self.lengths[layer] = start + new
        return self.keys[layer][..., : start + new, :], self.values[layer][..., : start + new, :]

    def _grow(self, layer: int, like: torch.Tensor, needed: int) -> None:
        old = self.keys[layer]
        capacity = max(needed, 2 * (0 if old is None else old.shape[-2]), 64)
        for store in (self.keys, self.values):
            buffer = like.new_empty((*like.shape[:-2], capacity, like.shape[-1]))
            if store[layer] is not None:
                length = self.lengths[layer]
                buffer[..., :length, :] = store[layer][..., :length, :]
            store[layer] = buffer

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (negative: drop that many), as DynamicCache.crop."""
        for i, length in enumerate(self.lengths):
            self.lengths[i] = min(length, max_length if max_length >= 0 else length + max_length)

    def keep_models(self, rows: list[int]) -> None:
        """Drop constituents from the cache (pruning); `rows` index the models held now."""
        index = None
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is None or k.shape[0] == 1:
                continue  # hub-only depth
            index = torch.tensor(rows, device=k.device) if index is None else index
            self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm (float32 statistics), with one weight per model [M, d]."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return weight[:, None, :] * normed


def _project(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual + x W^T + b for each model: x [M, N, in], weight [M, out, in] (transposed view,
    no copy). The residual add rides in the matmul (beta = 1) instead of a separate pass."""
    base = residual
    if bias is not None:
        base = bias[:, None, :] if base is None else base + bias[:, None, :]
    if base is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(base, x, weight.transpose(1, 2))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask_4d(
    attention_mask: torch.Tensor | None, batch: int, new: int, past: int, device
) -> torch.Tensor | None:
    """transformers' own SDPA mask ([B, 1, T, past+T] bool), None when plain causal suffices."""
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    return sdpa_mask(
        batch_size=batch,
        q_length=new,
        kv_length=past + new,
        q_offset=past,
        attention_mask=attention_mask,
        device=device,
    )


def _attend(q, k, v, mask, groups: int) -> torch.Tensor:
    """SDPA with grouped KV heads, choosing the same formulation as transformers' sdpa path."""
    new = q.shape[2]
    if groups == 1:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and new > 1
        )
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=new > 1, enable_gqa=True)
    if new == 1:  # one query: fold the query heads of a group into the query axis
        rows, heads, _, dim = q.shape
        out = F.scaled_dot_product_attention(
            q.reshape(rows, heads // groups, groups, dim), k, v, attn_mask=mask
        )
        return out.reshape(rows, heads, 1, dim)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _mlp(stacks: StackedWeights, layer: StackedLayer, x: torch.Tensor, residual) -> torch.Tensor:
    """residual + SwiGLU MLP. Few rows (decode): one fused gate+up matmul, fewest ops. Many rows:
    two matmuls on weight views, so that the activation reads contiguous memory (a strided half
    of a fused output made silu and the product about twice as slow at 8 x 256)."""
    if x.shape[1] <= _FUSE_ROWS:
        gate, up = _project(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
    else:
        weights = layer.gate_up.chunk(2, dim=1)
        biases = (None, None) if layer.gate_up_bias is None else layer.gate_up_bias.chunk(2, -1)
        gate, up = (_project(x, w, b) for w, b in zip(weights, biases, strict=True))
    if torch.is_grad_enabled():
        hidden = stacks.act(gate) * up
    else:  # no autograd: reuse the gate's memory
        hidden = stacks.act(gate).mul_(up)
    return _project(hidden, layer.down, layer.down_bias, residual)


def run_block(
    stacks: StackedWeights,
    layer: StackedLayer,
    index: int,
    x: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    cache: StackedCache | None,
) -> torch.Tensor:
    """One decoder block of M models at once: x [M, B, T, d] -> [M, B, T, d]."""
    models, batch, new, width = x.shape
    heads, kv_heads, dim = stacks.heads, stacks.kv_heads, stacks.head_dim
    flat = x.reshape(models, batch * new, width)
    qkv = _project(rms_norm(flat, layer.norm1, stacks.eps), layer.qkv, layer.qkv_bias)
    # rotary on q and k together (one set of ops); tables [B, T, hd] broadcast over M and heads
    qk = qkv[..., : (heads + kv_heads) * dim].reshape(models, batch, new, heads + kv_heads, dim)
    cos, sin = (t[None, :, :, None] for t in rotary)
    qk = qk * cos + _rotate_half(qk) * sin
    # [M, B, T, heads, hd] -> [M, B, heads, T, hd] (views)
    q, k = qk[..., :heads, :].transpose(2, 3), qk[..., heads:, :].transpose(2, 3)
    v = qkv[..., (heads + kv_heads) * dim :].reshape(models, batch, new, kv_heads, dim)
    v = v.transpose(2, 3)
    if cache is not None:
        k, v = cache.update(index, k, v)
    length = k.shape[-2]
    attn = _attend(
        q.reshape(models * batch, heads, new, dim),
        k.reshape(models * batch, kv_heads, length, dim),
        v.reshape(models * batch, kv_heads, length, dim),
        None if mask is None else mask.repeat(models, 1, 1, 1),
        heads // kv_heads,
    )
    attn = attn.reshape(models, batch, heads, new, dim).transpose(2, 3)
    flat = _project(attn.reshape(models, batch * new, heads * dim), layer.o, layer.o_bias, flat)
    flat = _mlp(stacks, layer, rms_norm(flat, layer.norm2, stacks.eps), flat)
    return flat.reshape(models, batch, new, width)


# --- the stitched model's batched path ----------------------------------------------------------


class BatchedExecutor:
    """The batched path of one stitched model: its stacked weights, built on first use and
    rebuilt when a constituent's tensors change, and the forward over them. The stitch maths is
    the model's own (`model.apply_stitch`); this only runs the constituents' blocks together."""

    def __init__(self):
        self.stacked: StackedWeights | None = None
        self.unstackable: tuple | None = None  # (signature, reason) of the last refusal

    def stacks(self, model) -> StackedWeights | None:
        """The stacked weights; None when batching is off or the constituents cannot stack."""
        if not model.inference.batched:
            return None
        if self.stacked is not None and self.stacked.is_current():
            return self.stacked
        models = [model.hub, *model.experts.values()]
        signature = tuple((id(m), next(m.parameters()).data_ptr()) for m in models)
        if self.unstackable is not None and self.unstackable[0] == signature:
            return None
        reason = unstackable_reason(models, model.expert_depth) or _depth_reason(model)
        if reason is not None:
            self.unstackable, self.stacked = (signature, reason), None
            return None
        # the constituents' weights become views into the stacks: built as normal tensors even
        # under inference_mode (generate), or training the model afterwards would fail
        with torch.inference_mode(False):
            self.stacked = StackedWeights(models, model.expert_depth)
        return self.stacked

    def reason(self, model) -> str | None:
        """Why the model runs the per-model loop instead (None: it is batched)."""
        if not model.inference.batched:
            return "batched is off"
        return None if self.stacks(model) is not None else self.unstackable[1]

    def drop(self, leaving: nn.Module | None = None) -> None:
        """Forget the stacks (the constituents changed); a constituent `leaving` keeps its own
        copy of the weights, since it outlives them."""
        if leaving is not None and self.stacked is not None:
            self.stacked.unbind(leaving)
        self.stacked, self.unstackable = None, None

    def run(self, model, stacks, input_ids, attention_mask, cache, return_gates, names, keep):
        """(hub's final state, experts' final states, gate records), like the model's loop.
        Cache-less forwards go over groups of rows: rows are independent, and [M, rows, T, d]
        temporaries of a few MB get reused by the allocator, while one large batch maps fresh
        pages on every op (page faults made 8 x 256 slower than the loop; chunks fixed that)."""
        batch, length = input_ids.shape
        step = max(1, _CHUNK_TOKENS // ((len(names) + 1) * length))
        if cache is not None or step >= batch:
            return _run(model, stacks, input_ids, attention_mask, cache, return_gates, names, keep)
        parts = [
            _run(
                model, stacks, input_ids[rows],
                None if attention_mask is None else attention_mask[rows],
                None, return_gates, names, None if keep is None else keep[rows],
            )
            for rows in (slice(i, i + step) for i in range(0, batch, step))
        ]
        hidden = torch.cat([p[0] for p in parts])
        experts = {n: torch.cat([p[1][n] for p in parts]) for n in parts[0][1]}
        records = [
            replace(r, weights=torch.cat([p[2][i].weights for p in parts]))
            for i, r in enumerate(parts[0][2])
        ]
        return hidden, experts, records


def _run(model, stacks, input_ids, attention_mask, cache, return_gates, names, keep):
    """All constituents' blocks at one depth as one batched computation."""
    active = tuple([0] + [1 + model.expert_names.index(n) for n in names])
    layers = stacks.layers_for(None if len(active) == len(model.experts) + 1 else active)
    if cache is not None:
        _align_cache(cache, active)
    past = cache.get_seq_length() if cache is not None else 0
    positions = position_ids(input_ids, attention_mask, past)
    decoders = [adapter(model.hub, HUB), *(adapter(model.experts[n], n) for n in names)]
    x = torch.stack([d.embed(input_ids) for d in decoders])
    rotary = decoders[0].rotary(x[0], positions)
    batch, new = input_ids.shape
    mask = attention_mask_4d(attention_mask, batch, new, past, input_ids.device)
    records, finals = [], {}
    for index, layer in enumerate(layers):
        x = run_block(stacks, layer, index, x, rotary, mask, cache)
        if str(index) not in model.stitches:
            continue
        streams = {HUB: x[0], **{n: x[i] for i, n in enumerate(names, start=1)}}
        hub, experts = model.apply_stitch(index, streams, names, keep, return_gates, records)
        if index + 1 >= model.expert_depth:  # only the hub runs deeper
            x, finals = hub[None], model.final_streams(experts, names)
        elif torch.is_grad_enabled():  # autograd needs the old streams: a new tensor
            x = torch.stack([hub, *(experts[n] for n in names)])
        else:  # write back in place: no fresh [M, B, T, d] allocation per stitch
            for i, stream in enumerate([hub, *(experts[n] for n in names)]):
                if stream is not streams[HUB if i == 0 else names[i - 1]]:
                    x[i].copy_(stream)
    if x.shape[0] > 1:  # the experts ran to the last block
        finals = model.final_streams({n: x[i] for i, n in enumerate(names, start=1)}, names)
    return x[0], finals, records


def _align_cache(cache: StackedCache, active: tuple[int, ...]) -> None:
    """A cache filled with more experts than now run (pruning after the prompt) drops them."""
    if cache.models is None or cache.get_seq_length() == 0:
        cache.models = active
        return
    if cache.models == active:
        return
    if not set(active) <= set(cache.models):
        raise BtsError(
            "the cache holds fewer experts than this forward runs: an expert pruned earlier in "
            "a sequence cannot come back; start again with model.new_cache()"
        )
    cache.keep_models([cache.models.index(m) for m in active])
    cache.models = active
