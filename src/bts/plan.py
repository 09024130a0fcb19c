"""Memory per device for every stage of a run, from the models' configs alone (`bts plan`).

Pure arithmetic over dataclasses; `bts.plan_report` reads the models' configs (no weights),
says what would help a stage that does not fit, and prints the table. Per device, N processes,
B = ceil(batch_size / N) rows of T = data.seq_len tokens (one micro-batch: grad_accum adds
micro-batches, not memory):

  weights      frozen parameters x their bytes (stitch.constituent_dtype for constituents)
  trainable    trainable parameters x 4 (fp32 masters)
  gradients    trainable x 4; x 2 under DDP with N > 1 (its gradient buckets are copies)
  optimiser    trainable x 8 (AdamW: two fp32 states)
  activations  B x T x (bytes per token kept for the backward pass) + per-stitch constants
  transient    FSDP: two gathered decoder blocks (the current one and the prefetched next);
               bf16 mixed precision: bf16 copies of the trainable weights (x 2; sharded
               under FSDP, whose mixed-precision policy casts each unit as it gathers it)
  runtime      RUNTIME_BYTES, the process's resident baseline before any model exists
FSDP divides weights, trainable, gradients and optimiser by N; DDP replicates them.

Activations per token, in elements of the activation dtype (fp32; bf16 with bf16 constituents
or bf16 mixed precision), for transformers' Llama block on the sdpa path (q, k, v, the output
and its log-sum-exp kept; the eager path adds heads x T scores), counted with
torch.autograd.graph.saved_tensors_hooks; d hidden, i intermediate, k = kv heads x head dim,
h heads, n experts, E MoE experts of which r run per token (E for soft routing):
  trained block                   8d + 4i + 2k + h
  frozen block, input needs grad  4d + 3i + 2k + h   (before the first stitch that changes its
                                                     stream a frozen block keeps nothing)
  checkpointed frozen block       d, its input (+ one frozen block recomputed in the backward)
  BTX block                       8d + 2k + h + r(4i + 2d) + 2E
  BAM block                       4d + E(4d + 2k + h) + r(4i + 2d) + 2E (+ E d with adapters)
  stitch, experts-into-hub        (8n + 10) d0 in fp32, + the concatenated gates (1 + n) d0^2
                                  once when the hub's stream needs grad
  stitch, hub-into-experts        (4n + 2) d0 in fp32, + n d0^2 likewise
  logits                          LOGIT_COPIES x V in fp32 (the logits, the loss's flattened copy,
                                  its log-softmax; the gradients take their place in the
                                  backward), + V in the activation dtype when that is not fp32;
                                  the output stitch: 2(1 + n) + 3 (every head is kept, and
                                  the backward holds about as many gradients: measured,
                                  docs/scaling.md)
Evaluation (one process, whatever the launcher) and the routing targets run without grad: they
keep only the logits (3 copies; 4(1 + n) + 3 with the output stitch) and the final streams.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bts.baselines import registry
from bts.baselines.specs import BAMSpec, BTXSpec, RoutingSpec
from bts.config import RunConfig
from bts.heads import EVIDENCE_INIT
from bts.spec import EXPERTS_INTO_HUB, HUB_INTO_EXPERTS, StitchSpec, depth_map

GIB = 2**30
# `bts`'s resident memory before any model exists: VmRSS of a fresh process after importing
# torch, transformers, bts.stitch and bts.train and one autograd step (torch 2.13, transformers
# 5.23, 2 threads; /proc/self/status on this 2-core machine: 412,900 kB, twice within 0.1 MB).
RUNTIME_BYTES = 412_900 * 1024
LOGIT_COPIES = 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """A Llama-like decoder (Llama, Mistral, Qwen2/3, Gemma 2/3): what its sizes depend on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = True
    head_dim: int | None = None
    attention_bias: bool = False  # q, k, v biases (Qwen2)
    qk_norm: bool = False  # per-head q and k norms (Qwen3, Gemma 3)
    norms: int = 2  # RMS norms per block (Gemma 2/3: 4)

    @property
    def q(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def attention_params(self) -> int:
        bias = self.q + 2 * self.kv if self.attention_bias else 0
        norms = 2 * self.q // self.heads if self.qk_norm else 0
        return 2 * self.hidden * (self.q + self.kv) + bias + norms

    def block_params(self) -> int:
        mlp = 3 * self.hidden * self.intermediate
        return self.attention_params() + mlp + self.norms * self.hidden

    def params(self) -> int:
        """Embeddings (and an untied head), blocks and the final norm."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.block_params() + self.hidden

    def trained_block(self) -> int:
        return 8 * self.hidden + 4 * self.intermediate + 2 * self.kv + self.heads

    def frozen_block(self) -> int:
        return 4 * self.hidden + 3 * self.intermediate + 2 * self.kv + self.heads


def shape_of(config) -> Shape:
    """The Shape of a transformers config (read without weights)."""
    kind, heads = config.model_type, config.num_attention_heads
    return Shape(
        vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=config.intermediate_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        head_dim=getattr(config, "head_dim", None),
        attention_bias=bool(getattr(config, "attention_bias", kind == "qwen2")),
        qk_norm=kind in ("qwen3", "gemma3_text"), norms=4 if kind.startswith("gemma") else 2,
    )  # fmt: skip


@dataclass(frozen=True)
class Shapes:
    seed: Shape
    experts: dict[str, Shape]  # every expert, trained here or pretrained


def stitch_params(spec: StitchSpec, hub: int, widths: list[int]) -> int:
    """Exactly what StitchedModel creates: per stitch point the hub's gate (experts-into-hub)
    and per expert of width w a projection, a gate and a scale; then the output stitch."""
    bias = int(spec.gate_bias)
    total = 0
    for point in spec.placement:
        if point.kind == EXPERTS_INTO_HUB:  # P_i: w -> d0, gate d0 -> d0, scale d0
            total += hub * (hub + bias) + sum(w * hub + hub * (hub + bias) + hub for w in widths)
        else:  # P'_i: d0 -> w, gate d0 -> w, scale w
            total += sum(hub * w + w * (hub + bias) + w for w in widths)
    if spec.output == "mixture":  # a d0 -> 1 gate per source, a prior per expert (bts.heads)
        evidence = len(EVIDENCE_INIT) if spec.output_evidence else 0
        total += (1 + len(widths)) * (hub + 1) + len(widths) + evidence
    return total


@dataclass(frozen=True)
class Stage:
    """What one stage holds: its own parameters, batch shape and activation bytes."""

    name: str
    frozen_bytes: int
    trainable: int  # parameters
    rows: int  # rows of one micro-batch, all processes together
    seq: int
    token_bytes: int  # activations per token
    fixed_bytes: int = 0  # activations independent of the batch
    block_bytes: int = 0  # the largest decoder block: FSDP's gathered unit
    autocast: bool = False  # bf16 mixed precision
    batch_key: str = ""  # the config key of its batch size
    distributed: bool = True  # False: one process whatever the launcher (evaluation)


@dataclass(frozen=True)
class Memory:
    """One stage's bytes on one device (the module docstring defines each)."""

    stage: str
    rows: int
    weights: int
    trainable: int
    gradients: int
    optimiser: int
    activations: int
    transient: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return sum(v for k, v in asdict(self).items() if k not in ("stage", "rows"))


def per_device(stage: Stage, processes: int = 1, fsdp: bool = False) -> Memory:
    """A stage's memory on each of `processes` devices, sharded (FSDP) or replicated (DDP)."""
    processes, fsdp = (processes, fsdp) if stage.distributed else (1, False)
    shard = processes if fsdp else 1
    rows = max(1, math.ceil(stage.rows / processes))
    buckets = 2 if processes > 1 and not fsdp else 1
    gathered = 2 * stage.block_bytes if fsdp and processes > 1 else 0
    return Memory(
        stage.name, rows, stage.frozen_bytes // shard, 4 * stage.trainable // shard,
        4 * buckets * stage.trainable // shard, 8 * stage.trainable // shard,
        rows * stage.seq * stage.token_bytes + stage.fixed_bytes,
        gathered + (2 * stage.trainable // shard if stage.autocast else 0),
    )  # fmt: skip


def logits(vocab: int, act: int, copies: int = LOGIT_COPIES) -> int:
    """Bytes per token of the logits: fp32 copies, + the head's own output if not fp32."""
    return copies * vocab * 4 + (vocab * act if act != 4 else 0)


def lm_stage(name, shape: Shape, train, rows, seq, key, frozen_output=False) -> Stage:
    """Training every weight of one causal LM (the seed; an expert, its output space frozen
    with `frozen_output`)."""
    act = 2 if train.mixed_precision == "bf16" else 4
    output = shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden
    frozen = output if frozen_output else 0
    tokens = shape.layers * shape.trained_block() * act + 2 * shape.hidden * act
    return Stage(name, 4 * frozen, shape.params() - frozen, rows, seq,
                 tokens + logits(shape.vocab, act), 0, 4 * shape.block_params(),
                 act == 2, key)  # fmt: skip


def _frozen_blocks(shape: Shape, blocks: int, act: int, recompute: bool) -> int:
    return max(0, blocks) * (shape.hidden if recompute else shape.frozen_block()) * act


def stitched_activations(spec: StitchSpec, hub: Shape, experts: dict[str, Shape], act: int,
                         recompute: bool) -> tuple[int, int]:  # fmt: skip
    """(bytes per token, fixed bytes) a stitched model keeps for the backward pass."""
    points, mixture = spec.placement, spec.output == "mixture"
    into_hub = [p.after_layer for p in points if p.kind == EXPERTS_INTO_HUB]
    per_token = _frozen_blocks(hub, hub.layers - 1 - into_hub[0], act, recompute)
    changes = (HUB_INTO_EXPERTS, EXPERTS_INTO_HUB if spec.expert_stream == "project" else None)
    for name, shape in experts.items():
        blocks = spec.depth_maps.get(name) or depth_map(points, hub.layers, shape.layers)
        last = shape.layers if mixture else blocks[-1] + 1
        first = next(
            (b for b, p in zip(blocks, points, strict=True) if p.kind in changes), last - 1
        )
        per_token += _frozen_blocks(shape, last - 1 - first, act, recompute)
    if recompute:  # one block's activations come back at a time in the backward pass
        per_token += max(s.frozen_block() for s in [hub, *experts.values()]) * act
    n, d = len(experts), hub.hidden
    per_token += (
        4 * d * sum(8 * n + 10 if p.kind == EXPERTS_INTO_HUB else 4 * n + 2 for p in points)
    )
    gates = [
        1 + n if p.kind == EXPERTS_INTO_HUB else n for p in points if p.after_layer > into_hub[0]
    ]
    sources = 1 + n if mixture else 1
    heads = (2 * sources + 3) * hub.vocab * 4 if mixture else logits(hub.vocab, act)
    return per_token + sources * d * act + heads, 4 * d * d * sum(gates)


def stitch_stage(config: RunConfig, shapes: Shapes, name: str) -> Stage:
    """The stitch stage (`bts`, or `bts_heads` with the output stitch): frozen constituents."""
    cfg = config.stitch
    hub, experts = constituents(config, shapes)
    spec = cfg.spec(hub.layers)
    act = DTYPE_BYTES[cfg.constituent_dtype]
    act = 2 if cfg.train.mixed_precision == "bf16" else act
    tokens, fixed = stitched_activations(spec, hub, experts, act, cfg.checkpoint_frozen)
    frozen = sum(s.params() for s in [hub, *experts.values()])
    blocks = max(s.block_params() for s in [hub, *experts.values()])
    count = stitch_params(spec, hub.hidden, [s.hidden for s in experts.values()])
    return Stage(name, frozen * DTYPE_BYTES[cfg.constituent_dtype], count, cfg.batch_size,
                 config.data.seq_len, tokens, fixed, blocks * DTYPE_BYTES[cfg.constituent_dtype],
                 cfg.train.mixed_precision == "bf16", "stitch.batch_size")  # fmt: skip


def eval_stage(config: RunConfig, shapes: Shapes, name: str) -> Stage:
    """Held-out losses of a stitched model: a forward without grad at eval.batch_size."""
    cfg = config.stitch
    hub, experts = constituents(config, shapes)
    spec = cfg.spec(hub.layers)
    act, sources = DTYPE_BYTES[cfg.constituent_dtype], 1 + len(experts)
    count = stitch_params(spec, hub.hidden, [s.hidden for s in experts.values()])
    frozen = sum(s.params() for s in [hub, *experts.values()]) * act + 4 * count
    heads = (
        (4 * sources + 3) * hub.vocab * 4 if spec.output == "mixture" else logits(hub.vocab, act)
    )
    return Stage(name, frozen, 0, config.eval.batch_size,
                 config.data.seq_len, heads + 2 * sources * hub.hidden * act,
                 batch_key="eval.batch_size", distributed=False)  # fmt: skip


def constituents(config: RunConfig, shapes: Shapes) -> tuple[Shape, dict[str, Shape]]:
    """The hub's Shape and the stitched experts' (the seed a spoke when an expert is the hub)."""
    spokes = {n: shapes.experts[n] for n in config.stitched_experts}
    if config.stitch.hub == "seed":
        return shapes.seed, spokes
    return shapes.experts[config.stitch.hub], {"seed": shapes.seed, **spokes}


def baseline_stage(config: RunConfig, shapes: Shapes, system: registry.System) -> Stage:
    """BTX, BAM (with adapters) or expert routing at the stitch stage's batch shape."""
    s, train = shapes.seed, system.schedule or config.stitch.train
    act, n = (2 if train.mixed_precision == "bf16" else 4), len(shapes.experts)
    rows, seq, key = config.stitch.batch_size, config.data.seq_len, "stitch.batch_size"
    if system.baseline.kind == "routing":  # frozen models scored without grad, a linear router
        frozen = 4 * (s.params() + sum(e.params() for e in shapes.experts.values()))
        tokens = logits(s.vocab, act) + 2 * s.hidden * act
        router = (s.hidden + 1) * (1 + n)
        return Stage(system.name, frozen, router, rows, seq, tokens, batch_key=key)
    spec = system.spec
    experts = n + int(spec.include_seed)
    bam = isinstance(spec, BAMSpec)
    routing = spec.ffn_routing if bam else spec.routing
    active = {"soft": experts, "top1": 1}.get(routing, spec.num_experts_per_tok)
    attention = s.attention_params() * (experts if bam else 1) + s.hidden * experts * bam
    adapters = 2 * experts * s.hidden**2 if bam and spec.adapters else 0
    block = attention + experts * (3 * s.hidden * s.intermediate + s.hidden) + 2 * s.hidden
    params = s.params() + s.layers * (block + adapters - s.block_params())
    routers = s.layers * s.hidden * experts * (2 if bam else 1)
    trainable = params if spec.train_all else routers + s.layers * adapters
    mix = active * (4 * s.intermediate + 2 * s.hidden) + 2 * experts
    if bam:
        heads = experts * (4 * s.hidden + 2 * s.kv + s.heads + s.hidden * spec.adapters)
        tokens = 4 * s.hidden + heads + mix
    else:
        tokens = 8 * s.hidden + 2 * s.kv + s.heads + mix
    per_token = (s.layers * tokens + 2 * s.hidden) * act + logits(s.vocab, act)
    folded = 4 * s.layers * experts * s.hidden * s.intermediate if adapters else 0
    return Stage(system.name, 4 * (params - trainable), trainable, rows, seq, per_token,
                 folded, 4 * (block + adapters), act == 2, key)  # fmt: skip


def stages(config: RunConfig, shapes: Shapes) -> list[Stage]:
    """Every stage a run trains or evaluates, in pipeline order."""
    seq, out, seed = config.data.seq_len, [], shapes.seed
    spec = config.seed_model
    if spec.kind == "tiny":
        out.append(lm_stage("seed", seed, spec.train, spec.batch_size, seq,
                            "seed_model.batch_size"))  # fmt: skip
    if config.expert_domains:
        e = config.experts  # one at a time, each alone
        out.append(lm_stage("experts", seed, e.train, e.batch_size, seq, "experts.batch_size",
                            not e.train_embeddings))  # fmt: skip
    out.append(stitch_stage(config, shapes, "bts"))
    if config.bts_heads is not None:
        out.append(stitch_stage(config.heads_config(), shapes, "bts_heads"))
    same_shape = all(e == seed for e in shapes.experts.values())
    for system in registry.enabled_systems(config.baselines):
        # trained baselines only (merges and BTM train nothing); BTX and BAM need one shape
        moe = isinstance(system.spec, (BTXSpec, BAMSpec))
        if isinstance(system.spec, RoutingSpec) or (moe and same_shape):
            out.append(baseline_stage(config, shapes, system))
    out.append(eval_stage(config, shapes, "eval bts"))
    if config.bts_heads is not None:
        out.append(eval_stage(config.heads_config(), shapes, "eval bts_heads"))
    return out
