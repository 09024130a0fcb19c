"""The one training loop of every stage: AdamW, warmup + cosine, gradient accumulation,
a stability guard that skips bad steps, exact resume from atomic pickle-free checkpoints.

Runs single-process by default and unchanged under `accelerate launch` / `torchrun` (DDP), or
sharded under `accelerate launch --config_file configs/accelerate/fsdp.yaml` (FSDP2,
bts.distributed: each decoder block and stitch layer its own unit). Checkpoints hold full tensors
under every launcher, so a run resumes with another world size or launcher.
Data order is a function of the step only: optimizer step `s` uses the global micro-batches
`batch_fn(s * grad_accum + k)`, and rank `r` of `W` takes rows `r::W` of each of them.

Choices worth knowing:
- A skipped step (non-finite loss or gradient norm, or a loss spike) still consumes its data
  and advances the step counter and the learning-rate schedule, so the schedule and data
  order stay functions of the step; only the optimizer update is dropped.
- The schedule is a function of (current config, step): on resume the learning rate and the
  optimizer hyperparameters come from the config passed now, so "lower lr and rerun" works.
- Weight decay applies to matrices only (ndim >= 2), not to norms and biases.
- Metrics records carry the loss of the logged step (global mean over micro-batches and ranks)
  and `skipped`, the number of steps skipped so far.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, gather_object, set_seed
from torch.utils.tensorboard import SummaryWriter
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from bts import distributed
from bts.errors import BtsError
from bts.fields import Count, Float, NonNegativeFloat, PositiveCount, PositiveFloat
from bts.progress import progress

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
RESULT = "train_result.json"
SPIKE_WINDOW = 50  # the running mean of the spike test covers this many recent accepted losses
_NO_SKIP, _NON_FINITE, _SPIKE = 0, 1, 2
_REASONS = {_NON_FINITE: "non-finite loss or gradient norm", _SPIKE: "loss spike"}


class TrainConfig(pydantic.BaseModel, extra="forbid"):
    """Hyperparameters of one training run; the defaults of every stage live here."""

    steps: PositiveCount  # optimizer steps
    lr: PositiveFloat = 1e-3
    min_lr_ratio: Annotated[NonNegativeFloat, pydantic.Field(le=1)] = 0.01  # cosine floor
    warmup_steps: Count = 0
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[Annotated[Float, pydantic.Field(ge=0, lt=1)], Annotated[Float, pydantic.Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    max_grad_norm: PositiveFloat | None = 1.0
    grad_accum: PositiveCount = 1
    mixed_precision: Literal["no", "bf16"] = "no"
    checkpoint_every: PositiveCount = 100
    log_every: PositiveCount = 10
    seed: Count = 0
    spike_factor: PositiveFloat = 3.0  # loss > spike_factor * running mean is a spike ...
    # ... and at least this many nats above it: a small loss (a router's, near 0) varies by
    # large ratios from batch to batch without anything going wrong
    spike_min_delta: NonNegativeFloat = 0.5
    spike_warmup: Count = 20  # ... once this many steps were accepted
    max_consecutive_skips: PositiveCount = 5


class TrainResult(pydantic.BaseModel):
    """What a finished run reports; `train_result.json` holds it and marks the stage complete."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float  # loss of the last accepted step
    skipped: int


@dataclass
class _Progress:
    """Everything besides tensors that a resume needs, including the stability guard's state."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_loss: float = math.nan
    recent: list[float] = field(default_factory=list)  # recent accepted losses
    accepted: int = 0
    consecutive_skips: int = 0
    skipped: int = 0

    def skip_code(self, loss: float, grad_norm: float, cfg: TrainConfig) -> int:
        """Why this step must not update the weights (`_NO_SKIP` when it may)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return _NON_FINITE
        if self.accepted >= cfg.spike_warmup and self.recent:
            mean = sum(self.recent) / len(self.recent)
            if loss > cfg.spike_factor * mean and loss - mean > cfg.spike_min_delta:
                return _SPIKE
        return _NO_SKIP

    def record(self, loss: float, skipped: bool) -> None:
        """Update the guard's running state after a step."""
        if skipped:
            self.skipped += 1
            self.consecutive_skips += 1
            return
        self.consecutive_skips = 0
        self.accepted += 1
        self.last_loss = loss
        self.recent = (self.recent + [loss])[-SPIKE_WINDOW:]


def train(
    model: torch.nn.Module,
    batch_fn: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    out_dir: Path,
    *,
    name: str = "train",
    stop_after: int | None = None,
) -> TrainResult:
    """Train the parameters of `model` that require grad, resuming from `out_dir/checkpoint`.

    `model(input_ids=x, labels=x).loss` is the objective (an MoE's auxiliary loss is already
    in it). The passed model is updated in place and returned to plain `nn.Module` form.
    `stop_after` stops (after a checkpoint) once that many steps are done in total.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = _make_accelerator(cfg)
    was_training, own_forward = model.training, "forward" in vars(model)
    try:
        return _Run(accelerator, model, batch_fn, cfg, out_dir, name).run(stop_after)
    finally:
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drops the autocast wrapper
        if not own_forward:  # ... but leaves a bound copy of the class's forward behind
            vars(model).pop("forward", None)
        model.train(was_training)


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    """A fresh Accelerator; GPU when there is one, else CPU (gloo under a launcher)."""
    precision = cfg.mixed_precision
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU does not support bf16: training in fp32")
        precision = "no"
    # Each train() call may ask for another precision; keep the process group, reset the rest.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),
    )


class _Run:
    """One call of `train`: the prepared objects and the loop over optimizer steps."""

    def __init__(self, accelerator, model, batch_fn, cfg, out_dir, name):
        self.acc: Accelerator = accelerator
        self.model: torch.nn.Module = model
        self.batch_fn = batch_fn
        self.cfg: TrainConfig = cfg
        self.out_dir: Path = out_dir
        self.name: str = name
        self.named = _trainable(model)  # re-read once sharded: FSDP swaps in DTensor parameters
        if not self.named:
            raise BtsError(
                f"training '{name}': the model has no trainable parameters: unfreeze some"
            )
        self.progress = _Progress()
        self.home: torch.device | None = None  # set while the model is sharded (FSDP)

    def run(self, stop_after: int | None) -> TrainResult:
        """Resume or start, train up to `min(cfg.steps, stop_after)` steps, checkpoint."""
        ckpt = _recover_checkpoint(self.acc, self.out_dir)
        if ckpt is not None:
            self.progress = _read_progress(ckpt)
            _load_weights(self.model, self.named, ckpt)
            if self.progress.step > self.cfg.steps:
                raise BtsError(
                    f"checkpoint {ckpt} is at step {self.progress.step}, past steps="
                    f"{self.cfg.steps}: raise steps or delete {ckpt} to restart this stage"
                )
        if self.progress.step == self.cfg.steps:
            return self._finish()
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, stop_after)
        if self.progress.step >= end:
            return self._result()
        self._prepare(ckpt)
        self._loop(end)
        result = self._finish() if self.progress.step == self.cfg.steps else self._result()
        if self.home is not None:  # not on an error: one rank alone would hang in the gather
            distributed.unshard(self.model, self.home)
        return result

    def _prepare(self, ckpt: Path | None) -> None:
        """Build optimizer and schedule, wrap for accelerate, restore state or seed RNGs."""
        plugin = distributed.fsdp_plugin(self.acc)
        if plugin is not None:  # the checkpoint's weights are already in: they are sharded too
            self.home = distributed.shard(self.model, plugin)
            self.named = _trainable(self.model)
        decay = [p for _, p in self.named if p.ndim >= 2]
        no_decay = [p for _, p in self.named if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}]
        groups += [{"params": no_decay, "weight_decay": 0.0}] if no_decay else []
        optimizer = torch.optim.AdamW(
            groups, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps
        )
        # The scheduler is stepped by hand (not prepared): accelerate would step it once
        # per process, making the schedule depend on the world size.
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, self.cfg.warmup_steps, self.cfg.steps, min_lr_rate=self.cfg.min_lr_ratio
        )
        if plugin is not None and self.acc.distributed_type != DistributedType.FSDP:
            # FSDP on CPU, which accelerate leaves as MULTI_CPU: prepare would wrap DDP around it
            self.wrapped, self.optimizer = self.model, self.acc.prepare(optimizer)
        else:
            self.wrapped, self.optimizer = self.acc.prepare(self.model, optimizer)
        if ckpt is None:
            set_seed(self.cfg.seed + self.acc.process_index)
        else:
            _load_optimizer(self.optimizer, ckpt)
            _load_scheduler(self.scheduler, ckpt, self.cfg.lr)
            _set_rng_state(*_read_rng(ckpt, self.acc.process_index))
        if self.acc.is_main_process:
            _truncate_metrics(self.out_dir / METRICS, self.progress.step)
            (self.out_dir / RESULT).unlink(missing_ok=True)  # the stage is not complete
        self.acc.wait_for_everyone()

    def _loop(self, end: int) -> None:
        """Optimizer steps from the current step to `end`, with logging and checkpoints."""
        main = self.acc.is_main_process
        writer = (
            SummaryWriter(self.out_dir / "tb", purge_step=self.progress.step + 1) if main else None
        )
        bar = progress(
            total=self.cfg.steps,
            initial=self.progress.step,
            desc=self.name,
            unit="step",
            disable=not main,
        )
        self.wrapped.train()
        start, seconds0 = time.perf_counter(), self.progress.seconds
        window = (time.perf_counter(), self.progress.tokens)  # for tokens/s between logs
        try:
            while self.progress.step < end:
                lr = self.optimizer.param_groups[0]["lr"]
                loss, grad_norm = self._step()
                self.progress.seconds = seconds0 + time.perf_counter() - start
                now = time.perf_counter()
                tps = (self.progress.tokens - window[1]) / max(now - window[0], 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}", refresh=False)
                bar.update(1)  # after the postfix, so that a log line shows this step's loss
                step = self.progress.step
                if main and (step % self.cfg.log_every == 0 or step == self.cfg.steps):
                    self._log(writer, loss, lr, grad_norm, tps)
                    window = (now, self.progress.tokens)
                if step % self.cfg.checkpoint_every == 0 or step == end:
                    self._save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()

    def _step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches; skipped if the guard says so."""
        cfg, step = self.cfg, self.progress.step
        losses = []
        for k in range(cfg.grad_accum):
            batch = self.batch_fn(step * cfg.grad_accum + k)
            self.progress.tokens += batch.numel()
            rows = _local_rows(batch, step * cfg.grad_accum + k, self.acc).to(self.acc.device)
            with self.acc.accumulate(self.wrapped):
                loss = self.wrapped(input_ids=rows, labels=rows).loss
                if loss is None:
                    raise BtsError(f"training '{self.name}': the model returned no loss")
                self.acc.backward(loss)
            losses.append(loss.detach().float())
        loss = self.acc.reduce(torch.stack(losses).mean(), "mean").item()
        params = [p for _, p in self.named]
        norm = self.acc.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        grad_norm = distributed.full(norm).item()
        code = self.progress.skip_code(loss, grad_norm, cfg)
        code = int(self.acc.gather(torch.tensor([code], device=self.acc.device)).max())
        if code == _NO_SKIP:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.progress.step += 1
        self.progress.record(loss, skipped=code != _NO_SKIP)
        if code != _NO_SKIP:
            self._skipped(loss, _REASONS[code])
        return loss, grad_norm

    def _skipped(self, loss: float, reason: str) -> None:
        """Log a skipped step; give up after too many in a row."""
        step, run = self.progress.step, self.progress.consecutive_skips
        if self.acc.is_main_process:
            logger.warning(
                "training '%s': skipped step %d (%s, loss %.4g)", self.name, step, reason, loss
            )
            record = {"event": "skip", "step": step, "loss": loss, "reason": reason}
            _append_jsonl(self.out_dir / METRICS, record)
        if run >= self.cfg.max_consecutive_skips:
            raise BtsError(
                f"training '{self.name}' diverged: {run} consecutive skipped steps at step {step} "
                f"(last loss {loss:.4g}, {reason}); lower lr (now {self.cfg.lr}), raise "
                f"warmup_steps or lower max_grad_norm, then rerun to resume from the last checkpoint"
            )

    def _log(self, writer: SummaryWriter, loss: float, lr: float, grad_norm: float, tps: float):
        """One metrics record and its TensorBoard scalars."""
        p = self.progress
        record = {
            "step": p.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": p.tokens,
            "tokens_per_s": tps,
            "skipped": p.skipped,
        }
        _append_jsonl(self.out_dir / METRICS, record)
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            writer.add_scalar(f"{self.name}/{key}", record[key], p.step)

    def _save(self) -> None:
        """Checkpoint the run; every rank contributes its RNG state (and, under FSDP, its shards
        of the weights and optimizer state: gathered on every rank, in the same order)."""
        weights = {n: distributed.full(p) for n, p in self.named}  # names of the unwrapped model
        optim_state = _full_optimizer_state(self.optimizer.state_dict())
        rng = gather_object([_rng_state()])
        if self.acc.is_main_process:
            state = {
                "progress": asdict(self.progress),
                "world_size": self.acc.num_processes,
                "config": self.cfg.model_dump(mode="json"),
            }
            _save_checkpoint(
                self.out_dir,
                weights,
                optim_state,
                self.scheduler.state_dict(),
                rng,
                state,
            )
        self.acc.wait_for_everyone()

    def _result(self) -> TrainResult:
        p = self.progress
        return TrainResult(
            steps=p.step,
            tokens=p.tokens,
            seconds=p.seconds,
            final_loss=p.last_loss,
            skipped=p.skipped,
        )

    def _finish(self) -> TrainResult:
        """The stage is complete: write `train_result.json` (once, atomically)."""
        result = self._result()
        if self.acc.is_main_process:
            _atomic_json(self.out_dir / RESULT, result.model_dump())
        self.acc.wait_for_everyone()
        return result


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _local_rows(batch: torch.Tensor, index: int, acc: Accelerator) -> torch.Tensor:
    """This rank's rows `r::W` of global micro-batch `index`."""
    if batch.ndim != 2:
        raise BtsError(
            f"micro-batch {index} has shape {tuple(batch.shape)}: batch_fn must return [rows, seq_len]"
        )
    world = acc.num_processes
    if batch.shape[0] % world:
        raise BtsError(
            f"micro-batch {index} has {batch.shape[0]} rows, not divisible by the world size {world}: "
            f"use a batch size that is a multiple of the number of processes"
        )
    return batch[acc.process_index :: world]


# ----- checkpoints: safetensors for tensors, JSON for the rest, replaced atomically -----


def _save_checkpoint(out_dir, weights, optim_state, sched_state, rngs, state) -> None:
    """Write a complete checkpoint into a temp dir, fsync it, then swap it in."""
    tmp = out_dir / f"{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_tensors(tmp / "model.safetensors", {n: p.detach() for n, p in weights.items()})
    tensors, meta = _flatten_optimizer(optim_state)
    _write_tensors(tmp / "optimizer.safetensors", tensors)
    _write_json(tmp / "optimizer.json", meta)
    _write_json(tmp / "scheduler.json", sched_state)
    for rank, (tensors, meta) in enumerate(rngs):
        _write_tensors(tmp / f"rng_{rank}.safetensors", tensors)
        _write_json(tmp / f"rng_{rank}.json", meta)
    _write_json(tmp / "trainer_state.json", state)
    _fsync(tmp)
    _swap_in(tmp, out_dir / CHECKPOINT)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`, keeping the old one as `.old` until the new one is in place."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover_checkpoint(acc: Accelerator, out_dir: Path) -> Path | None:
    """The checkpoint to resume from, finishing a swap that a crash interrupted."""
    final = out_dir / CHECKPOINT
    old = final.with_name(final.name + ".old")
    if acc.is_main_process:
        if not final.exists() and old.exists():
            old.rename(final)  # killed between the two renames of _swap_in
        for tmp in out_dir.glob(f"{CHECKPOINT}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    return final if final.exists() else None


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(cpu, str(path))
    _fsync(path)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))
    _fsync(path)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _write_json(tmp, obj)
    tmp.replace(path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _corrupt(path: Path, err: Exception) -> BtsError:
    return BtsError(
        f"checkpoint file {path} is unreadable ({type(err).__name__}: {err}): "
        f"delete {path.parent} to restart this stage from step 0"
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as err:  # any failure to parse means the file is unusable
        raise _corrupt(path, err) from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except Exception as err:
        raise _corrupt(path, err) from err


def _read_progress(ckpt: Path) -> _Progress:
    path = ckpt / "trainer_state.json"
    try:
        return _Progress(**_read_json(path)["progress"])
    except (KeyError, TypeError) as err:
        raise _corrupt(path, err) from err


def _load_weights(model: torch.nn.Module, named: list, ckpt: Path) -> None:
    """Copy the checkpoint's trainable weights into `model`, checking names and shapes."""
    path = ckpt / "model.safetensors"
    saved = _read_tensors(path)
    expected = {n: tuple(p.shape) for n, p in named}
    got = {n: tuple(t.shape) for n, t in saved.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise BtsError(
            f"checkpoint {path} does not match the model's trainable parameters (e.g. {diff}): "
            f"it was written for another model; delete {ckpt} to restart this stage"
        )
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])


def _full_optimizer_state(state: dict) -> dict:
    """An optimizer state_dict with every sharded tensor gathered whole (a no-op unsharded)."""
    per_param = {
        idx: {k: distributed.full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for idx, s in state["state"].items()
    }
    return {**state, "state": per_param}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and structure (JSON)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _load_optimizer(optimizer, ckpt: Path) -> None:
    """Restore per-parameter optimizer state; hyperparameters come from the current config."""
    tensors = _read_tensors(ckpt / "optimizer.safetensors")
    meta = _read_json(ckpt / "optimizer.json")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        per_param.setdefault(int(idx), {}).update(values)
    groups = optimizer.state_dict()["param_groups"]
    saved_ids = [g["params"] for g in meta["param_groups"]]
    if [len(g["params"]) for g in groups] != [len(ids) for ids in saved_ids]:
        raise BtsError(
            f"checkpoint {ckpt}/optimizer.json has other parameter groups: delete {ckpt}"
        )
    groups = [{**g, "params": ids} for g, ids in zip(groups, saved_ids, strict=True)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip([i for ids in saved_ids for i in ids], params, strict=True))
    per_param = {  # full tensors on disk; under FSDP each rank keeps its shard of them
        idx: {k: distributed.shard_like(v, by_id[idx]) if isinstance(v, torch.Tensor) else v
              for k, v in values.items()}
        for idx, values in per_param.items()
    }
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def _load_scheduler(scheduler, ckpt: Path, lr: float) -> None:
    """Restore the schedule's position, re-based on the current peak `lr`."""
    scheduler.load_state_dict(_read_json(ckpt / "scheduler.json"))
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(scheduler.last_epoch)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch/CUDA/numpy/python RNG states as (tensors, JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, meta


def _read_rng(ckpt: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's saved RNG state (rank 0's when the world size grew)."""
    rank = rank if (ckpt / f"rng_{rank}.json").exists() else 0
    return _read_tensors(ckpt / f"rng_{rank}.safetensors"), _read_json(ckpt / f"rng_{rank}.json")


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors
    ]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ----- metrics -----


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> Iterator[dict]:
    """Records of a metrics file, skipping a line cut short by a crash."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after the checkpoint so a resumed log has no duplicates."""
    kept = [r for r in _read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
