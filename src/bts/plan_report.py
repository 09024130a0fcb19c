"""What `bts plan` reads and prints: the models' shapes from their configs (no weights), each
stage's memory per device (bts.plan), whether it fits a device, what would help if not, as a
table or as JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from bts import pretrained
from bts.config import RunConfig
from bts.plan import GIB, Memory, Shape, Shapes, Stage, per_device, shape_of, stages


def read_shapes(config: RunConfig) -> Shapes:
    """The seed's and every expert's Shape: from `seed_model`, or from their configs."""
    spec = config.seed_model
    if spec.kind == "tiny":
        seed = Shape(config.data.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads,
                     spec.num_kv_heads, spec.intermediate_size)  # fmt: skip
    else:
        source = spec.path or f"{pretrained.PACKAGE}{spec.package}"
        seed = shape_of(pretrained.read_config(pretrained.resolve(source, "the seed"), "the seed"))
    experts = dict.fromkeys(config.expert_domains, seed)
    for name, source in config.experts.pretrained.items():
        role = f"pretrained expert '{name}'"
        experts[name] = shape_of(pretrained.read_config(pretrained.resolve(source, role), role))
    return Shapes(seed, experts)


# ----- what to change when a stage does not fit

Knob = Callable[[RunConfig, Stage], RunConfig | None]


def _set(config: RunConfig, key: str, value) -> RunConfig:
    """`config` with one `section.field` changed."""
    section, field = key.split(".")
    part = getattr(config, section).model_copy(update={field: value})
    return config.model_copy(update={section: part})


def _stitching(stage: Stage) -> bool:
    return stage.name in ("bts", "bts_heads") or stage.name.startswith("eval")


KNOBS: dict[str, Knob] = {
    "stitch.constituent_dtype: bfloat16": lambda c, s: (
        _set(c, "stitch.constituent_dtype", "bfloat16")
        if _stitching(s) and c.stitch.constituent_dtype == "float32" else None),
    "stitch.checkpoint_frozen: true": lambda c, s: (
        _set(c, "stitch.checkpoint_frozen", True)
        if s.name in ("bts", "bts_heads") and not c.stitch.checkpoint_frozen else None),
    "half the batch (batch_size / 2)": lambda c, s: (
        _set(c, s.batch_key, s.rows // 2) if s.rows > 1 else None),
    "half the sequence (data.seq_len / 2)": lambda c, s: (
        _set(c, "data.seq_len", s.seq // 2) if s.seq >= 16 else None),
}  # fmt: skip


def advice(config: RunConfig, shapes: Shapes, stage: Stage, processes: int, fsdp: bool,
           budget: float) -> list[str]:  # fmt: skip
    """Each knob that lowers the stage's memory, with its new total; then the fewest FSDP
    processes (a power of two) under which it fits, or why none does."""
    out = []
    for label, knob in KNOBS.items():
        changed = knob(config, stage)
        if changed is not None:
            again = next(s for s in stages(changed, shapes) if s.name == stage.name)
            total = per_device(again, processes, fsdp).total
            if total < per_device(stage, processes, fsdp).total:
                out.append(f"try {label}: {size(total)}{' (fits)' if total <= budget else ''}")
    if not stage.distributed:  # bts evaluates in one process
        out.append(f"runs in one process: its weights alone are {size(stage.frozen_bytes)}")
        return out
    counts = [
        n for n in (2**k for k in range(1, 13)) if n > processes or (n == processes and not fsdp)
    ]
    fitting = [n for n in counts if per_device(stage, n, True).total <= budget]
    if fitting:
        total = per_device(stage, fitting[0], True).total
        out.append(f"try FSDP over {fitting[0]} processes: {size(total)} (fits)")
    else:  # sharding never divides the activations of a device's last row
        alone = per_device(stage, stage.rows, True).activations
        out.append(f"no number of FSDP processes fits: one row's activations are {size(alone)}")
    return out


# ----- the plan and how it is shown


@dataclass(frozen=True)
class Plan:
    processes: int
    fsdp: bool
    device_memory: float | None  # GiB
    rows: list[tuple[Memory, bool | None, list[str]]]  # memory, fits, advice


def make_plan(config: RunConfig, processes: int = 1, fsdp: bool = False,
              device_memory: float | None = None, shapes: Shapes | None = None) -> Plan:  # fmt: skip
    """Every stage's memory per device; with `device_memory` (GiB), whether each fits and, if
    not, what would help."""
    shapes = shapes or read_shapes(config)
    rows = []
    for stage in stages(config, shapes):
        memory = per_device(stage, processes, fsdp)
        fits = None if device_memory is None else memory.total <= device_memory * GIB
        tips = (
            []
            if fits in (None, True)
            else advice(config, shapes, stage, processes, fsdp, device_memory * GIB)
        )
        rows.append((memory, fits, tips))
    return Plan(processes, fsdp, device_memory, rows)


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


COLUMNS = ("weights", "trainable", "gradients", "optimiser", "activations", "transient",
           "runtime", "total")  # fmt: skip


def format_plan(plan: Plan) -> str:
    """The plan as a table, one stage a line, and advice under each stage that does not fit."""
    how = "FSDP, sharded" if plan.fsdp else "DDP, replicated"
    lines = [f"memory per device: {plan.processes} process(es), {how}"]
    lines.append(f"{'stage':<15} {'rows':>4} " + " ".join(f"{c:>11}" for c in COLUMNS) + "  fits")
    for memory, fits, tips in plan.rows:
        values = [getattr(memory, c) for c in COLUMNS]
        mark = {None: "", True: "  yes", False: "  NO"}[fits]
        lines.append(f"{memory.stage:<15} {memory.rows:>4} "
                     + " ".join(f"{size(v):>11}" for v in values) + mark)  # fmt: skip
        lines += [f"    {tip}" for tip in tips]
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    """The plan as JSON values: bytes per device for each stage."""
    stages_out = [
        {**asdict(memory), "total": memory.total, "fits": fits, "advice": tips}
        for memory, fits, tips in plan.rows
    ]
    return {"processes": plan.processes, "sharding": "fsdp" if plan.fsdp else "ddp",
            "device_memory_gib": plan.device_memory, "stages": stages_out}  # fmt: skip
