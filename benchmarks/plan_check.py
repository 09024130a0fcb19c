"""`bts plan` against measurement: each stage's planned memory beside its measured peak on CPU.

    python benchmarks/plan_check.py [CONFIG] [--steps 2] [--stage NAME ...]

For each stage of the plan (one process), a fresh subprocess builds the stage's models from
random weights in the planned shapes (no data, no files), runs `steps` training steps at the
stage's batch shape (AdamW on what the stage trains; evaluation: bts.evaluate's loss function
under inference_mode), and reports its peak resident memory (VmHWM) and its resident memory
before any model existed. Each stage runs twice: with glibc's default malloc, which keeps freed
blocks resident (see LIVE), and with a fixed mmap threshold, under which the peak is the tensors'
own. Printed side by side: the plan without its runtime term against both measured growths
(VmHWM - that baseline), and the plan's total against the default run's VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _llama(shape, seq: int, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=seq,
        tie_word_embeddings=shape.tied,
    )  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy inflates the peak
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def _stitched(config, shapes):
    import torch

    from bts.models import MANIFEST_DTYPES
    from bts.plan import constituents
    from bts.stitch import StitchedModel

    seq, dtype = config.data.seq_len, MANIFEST_DTYPES[config.stitch.constituent_dtype]
    hub, experts = constituents(config, shapes)
    torch.manual_seed(0)
    models = {name: _llama(shape, seq, dtype) for name, shape in experts.items()}
    spec = config.stitch.spec(hub.layers)
    model = StitchedModel(_llama(hub, seq, dtype), models, spec)
    return model.set_inference(checkpoint_frozen=config.stitch.checkpoint_frozen)


def _baseline(config, shapes, name: str):
    import torch

    from bts.baselines import registry
    from bts.baselines.bam import BAMConfig, BAMForCausalLM, set_bam_trainable
    from bts.baselines.btx import BTXForCausalLM, btx_config, mixtral_kwargs, set_btx_trainable
    from bts.baselines.routing import RouterTrainer

    system = registry.find_system(config.baselines, name)
    seq, spec = config.data.seq_len, system.spec
    seed = _llama(shapes.seed, seq, torch.float32).config
    names = (["seed"] if getattr(spec, "include_seed", True) else []) + list(shapes.experts)
    if name == "expert_routing":
        models = {n: _llama(shapes.seed, seq, torch.float32) for n in names}
        return RouterTrainer(spec, models)
    if name.startswith("btx"):
        model = BTXForCausalLM(btx_config(seed, spec, names))
        set_btx_trainable(model, spec.train_all)
        return model
    kwargs = mixtral_kwargs(seed, spec.ffn_routing, spec, names)
    model = BAMForCausalLM(BAMConfig(**kwargs, bam_attention_experts=len(names),
                                     bam_adapters=spec.adapters))  # fmt: skip
    set_bam_trainable(model, spec.train_all)
    return model


def build(config, shapes, name: str):
    """The stage's model, in training mode with only its trained parameters requiring grad."""
    import torch

    from bts.models import freeze_output_space

    if name in ("seed", "experts"):
        model = _llama(shapes.seed, config.data.seq_len, torch.float32)
        if name == "experts" and not config.experts.train_embeddings:
            freeze_output_space(model)
        return model
    if name.startswith("eval"):
        heads = name.endswith("bts_heads")
        return _stitched(config.heads_config() if heads else config, shapes).eval()
    if name in ("bts", "bts_heads"):
        model = _stitched(config.heads_config() if name == "bts_heads" else config, shapes)
        model.train_only()
        return model
    return _baseline(config, shapes, name)


def measure(config_path: str, name: str, steps: int) -> dict:
    """One stage in this process: resident memory before its models, peak after `steps`."""
    import torch

    from bts.config import load_config
    from bts.evaluate import _token_losses
    from bts.plan import stages
    from bts.plan_report import read_shapes

    torch.set_num_threads(2)
    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()  # autograd and BLAS started, as in RUNTIME_BYTES
    base = _status("VmRSS")
    config = load_config(config_path)
    shapes = read_shapes(config)
    stage = next(s for s in stages(config, shapes) if s.name == name)
    model = build(config, shapes, name)
    ids = torch.randint(0, shapes.seed.vocab, (stage.rows, stage.seq))
    if name.startswith("eval"):
        with torch.inference_mode():  # as bts.evaluate runs it
            for _ in range(steps):
                _token_losses(model, ids)
        return {"base": base, "peak": _status("VmHWM")}
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    bf16 = stage.autocast
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        del loss
    return {"base": base, "peak": _status("VmHWM")}


# glibc returns a freed block to the OS only if it was mmapped; after the first large free it
# raises its mmap threshold (up to 32 MiB), so freed activations stay resident. A fixed
# threshold keeps every large tensor mmapped: the peak is then the tensors' own.
LIVE = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_stage(config: str, name: str, steps: int, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, config, "--steps", str(steps), "--one", name],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stage", action="append", help="Only these stages (repeatable)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, args.one, args.steps)))
        return
    from bts.config import load_config
    from bts.plan_report import make_plan, size

    plan = make_plan(load_config(args.config))
    print(f"{args.config}: plan (one process) vs measured peaks on CPU, {args.steps} steps a stage")
    print(
        "| stage | planned | tensors' peak | ratio | glibc default | ratio | planned total "
        "| VmHWM (default) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for memory, _, _ in plan.rows:
        if args.stage and memory.stage not in args.stage:
            continue
        live = run_stage(args.config, memory.stage, args.steps, LIVE)
        default = run_stage(args.config, memory.stage, args.steps, {})
        planned = memory.total - memory.runtime
        grown = [got["peak"] - got["base"] for got in (live, default)]
        print(
            f"| {memory.stage} | {size(planned)} | {size(grown[0])} | {planned / grown[0]:.2f} "
            f"| {size(grown[1])} | {planned / grown[1]:.2f} | {size(memory.total)} "
            f"| {size(default['peak'])} | {memory.total / default['peak']:.2f} |"
        )


if __name__ == "__main__":
    main()
