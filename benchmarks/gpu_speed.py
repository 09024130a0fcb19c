"""The stitched model's speed on an accelerator, prepared for a session that has one (issue 19).

Four randomly initialised Llama models of one shape (default d=1024, 16 layers, bf16: only the
speed matters) as the hub and three experts, stitched with bts's defaults, on `--device`:

- stitch training tokens/s (AdamW on the stitch parameters; the loop, then `batched_training`,
  then `stitch.compile_frozen`) against training nothing but the hub's forward and backward;
- no-grad forward of 8 x 512: batched against looped;
- greedy decoding at batch 1 (tokens/s): the stitched model (batched, speculative with the hub
  drafting) against the hub alone.

Variants take turns in every round; medians; ratios printed. On CPU use `--small` to check that
the script runs:

    python benchmarks/gpu_speed.py --device cuda            # about 3 minutes on one H100
    .venv/bin/python benchmarks/gpu_speed.py --device cpu --small
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bts import StitchedModel
from bts.stages import compile_frozen_blocks

VOCAB = 32768
NEVER = VOCAB + 1  # an end-of-sequence id no model emits: every decode runs its full length


def models(width: int, layers: int, dtype: torch.dtype, device: str) -> list[LlamaForCausalLM]:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=int(2.6875 * width) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=width // 64,
        num_key_value_heads=max(1, width // 256),
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    out = []
    for seed in range(4):
        torch.manual_seed(seed)
        out.append(LlamaForCausalLM(config).to(device=device, dtype=dtype).eval())
    return out


def stitched(constituents: list, **inference) -> StitchedModel:
    """A stitched model over copies of the constituents (compiling one variant's blocks must not
    compile the others')."""
    hub, *experts = (copy.deepcopy(m) for m in constituents)
    model = StitchedModel.from_models(hub, {f"e{i}": m for i, m in enumerate(experts)})
    model.train_only()
    return model.set_inference(**inference)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rounds(variants: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call; one warm-up call each (it compiles, where something does)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model, batch: torch.Tensor, params):
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run():
        model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def hub_step(hub, batch: torch.Tensor):
    """The hub's own forward and backward (to its input embeddings), for scale: a stitched step
    runs four such models."""
    def run():
        embeds = hub.get_input_embeddings()(batch).detach().requires_grad_(True)
        hub(inputs_embeds=embeds, labels=batch).loss.backward()

    return run


def forward(model, ids: torch.Tensor):
    def run():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    return run


def decode(model, prompt: torch.Tensor, new: int):
    def run():
        model.eval()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=NEVER,
                           pad_token_id=0)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="d=128, 4 layers (a CPU check)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    width, layers = (128, 4) if args.small else (1024, 16)
    device, dtype = args.device, torch.bfloat16
    constituents = models(width, layers, dtype, device)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, VOCAB, (8, 512), generator=gen).to(device)
    print(f"# bts on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}): "
          f"4 x Llama d={width}, {layers} layers, bf16; median of {args.repeats}\n")
    loop, batched = stitched(constituents), stitched(constituents, batched_training=True)
    compiled = stitched(constituents)
    compile_frozen_blocks(compiled)
    train = rounds({
        "loop": train_step(loop, batch, list(loop.stitch_parameters())),
        "batched_training": train_step(batched, batch, list(batched.stitch_parameters())),
        "compile_frozen": train_step(compiled, batch, list(compiled.stitch_parameters())),
        "hub alone": hub_step(constituents[0], batch),
    }, args.repeats, device)
    tokens = batch.numel()
    print("| stitch training 8 x 512 | tokens/s | vs hub alone |\n|---|---|---|")
    for name, seconds in train.items():
        print(f"| {name} | {tokens / seconds:,.0f} | {train['hub alone'] / seconds:.2f}x |")
    looped = stitched(constituents, batched=False)
    fwd = rounds({"batched": forward(loop, batch), "looped": forward(looped, batch)},
                 args.repeats, device)
    print(f"\nforward 8 x 512, no grad: batched {fwd['batched'] * 1e3:.1f} ms, looped "
          f"{fwd['looped'] * 1e3:.1f} ms ({fwd['batched'] / fwd['looped']:.2f}x)")
    prompt = batch[:1, :64]
    dec = rounds({"stitched": decode(loop, prompt, args.new_tokens),
                  "hub alone": decode(constituents[0], prompt, args.new_tokens)},
                 args.repeats, device)
    print(f"greedy decode, batch 1: stitched {args.new_tokens / dec['stitched']:.1f} tokens/s, hub "
          f"alone {args.new_tokens / dec['hub alone']:.1f} (the stitched model at "
          f"{dec['hub alone'] / dec['stitched']:.2f}x the hub's speed)")


if __name__ == "__main__":
    main()
