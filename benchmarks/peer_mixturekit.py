"""Peer check: MixtureKit 1.1.1's BTS against bts's stitch layers, same batches, same loop.

On one finished run, both stitch implementations are built over the run's seed (the hub) and
experts, trained with one plain loop written here (AdamW, 10% linear warm-up then cosine to 0,
grad clip 1.0) on the identical list of batches drawn from the run's stitch mix, and scored on
the same held-out rows as the report (the first `eval.max_sequences` of each domain, plus
domain_switch). The seed, each expert and the run's own stitched stage are scored too, without
training. Each training seed gives its own batch order and dropout masks; the table shows mean
+- sd over seeds, and a per-domain verdict from the paired per-seed differences
(docs/peer.md).

MixtureKit is not a dependency of bts; for this comparison only:

    .venv/bin/pip install --no-deps mixturekit==1.1.1
    .venv/bin/python benchmarks/peer_mixturekit.py runs/demo [--seeds 0,1,2] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from bts.compare import SWITCH, held_out_sets
from bts.data.packing import build_corpus
from bts.errors import BtsError
from bts.evaluate import held_out_loss
from bts.fileio import write_json
from bts.models import load_causal_lm
from bts.progress import quiet_libraries
from bts.repeat import with_train_seed
from bts.stages import (
    DATA_RECORD,
    Run,
    build_stitched,
    check_data,
    is_complete,
    make_seed,
    stitch_sampler,
    train_expert,
)
from bts.stitch import StitchedModel, causal_lm_loss
from bts.train import train

MISSING = (
    "MixtureKit is not installed: pip install --no-deps mixturekit==1.1.1 "
    "(for this comparison only; bts does not depend on it)"
)
PROGRESS_SECONDS = 30.0


def log(message: str) -> None:
    print(f"[peer] {message}", file=sys.stderr, flush=True)


def _elapsed(since: float) -> str:
    return _duration(time.perf_counter() - since)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --- the run (read-only) ----------------------------------------------------------------------


def load_run(root: Path):
    """The finished run, opened without its lock and without writing into it."""
    run = Run.load(root, lock=False)
    config = run.config
    needed = [run.path("seed")] + [run.path("experts", d) for d in config.expert_domains]
    missing = [str(p) for p in needed if not is_complete(p)]
    if not (run.path("stitched") / "bts_stitch.json").is_file():
        missing.append(str(run.path("stitched")))
    if missing:
        raise BtsError(
            f"{root} is not finished ({', '.join(missing)} missing): run `bts run` to the end "
            "first (this benchmark never trains a stage of the run)"
        )
    # Run.corpus records the data hashes in RUN/data.json on first use; a reader must not write
    # into the run, so the corpus is built here and checked against the record only if complete
    data = config.data
    corpus = build_corpus(
        data.sources,
        run.tokenizer,
        data.seq_len,
        run.cache_dir,
        config.seed,
        data.held_out_fraction,
        data.text_field,
    )
    record = run.path(DATA_RECORD)
    if record.is_file():
        saved = json.loads(record.read_text())
        if all(name in saved for name in corpus):
            check_data(record, corpus)  # reads only: every domain is recorded
    run.__dict__["corpus"] = corpus  # the cached_property's slot
    return run


def constituents(run) -> tuple[Path, list[tuple[str, Path]]]:
    """Hub and spokes as the stitch stage joins them (stages.build_stitched), as paths."""
    spec = run.config.stitch
    spokes = [(d, train_expert(run, d)) for d in run.config.stitched_experts]
    if spec.hub == "seed":
        return make_seed(run), spokes
    return train_expert(run, spec.hub), [("seed", make_seed(run)), *spokes]


def training_batches(run, seed: int, steps: int) -> list[torch.Tensor]:
    """The stitch stage's sampler (its mix over the stitch domains) at training seed `seed`:
    one list of batches per seed, shared by every system. Seed 0 gives the very batches the
    run's own stitch stage saw."""
    config = with_train_seed(run.config, seed)
    sampler = stitch_sampler(run, config.stitch_domains, config.stitch)
    return [sampler.batch(step) for step in range(steps)]


# --- the two systems ----------------------------------------------------------------------------


def mixturekit_config(hub: Path, spokes: list[tuple[str, Path]], layers: int) -> dict:
    return {
        "moe_method": "bts",
        "stitch_freq": max(1, layers // 4),
        "model_type": "bts_peer_mixturekit",
        "num_experts_per_tok": 2,
        "experts": [{"expert_name": "base_expert", "model_id": str(hub)}]
        + [
            {"expert_name": f"expert_{i}", "model_id": str(path)}
            for i, (_, path) in enumerate(spokes, start=1)
        ],
        "router_layers": [],
        "alpha": 0,
        "router_layers_index": [],
    }


def build_mixturekit_checkpoint(cfg: dict, out: Path, dtype: torch.dtype = torch.float32) -> None:
    from MixtureKit import build_moe

    with contextlib.redirect_stdout(sys.stderr):  # its "mapping expert ..." lines
        build_moe(dict(cfg), torch_dtype=dtype, output_dir=str(out))


def load_mixturekit(path: Path, dtype: torch.dtype = torch.float32):
    """The built model, with only the parameters whose names contain `stitch` trainable."""
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                     dtype=dtype)
    model.requires_grad_(False)
    count = 0
    for name, param in model.named_parameters():
        if "stitch" in name:
            param.requires_grad_(True)
            count += param.numel()
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {dtype}:
        raise RuntimeError(f"MixtureKit model loaded as {dtypes}, expected {dtype}")
    return model, count


def mixturekit_layout(model) -> dict:
    """Where MixtureKit put its stitch layers, their kinds, and what they start from."""
    stitches, unused = [], 0
    for index, layer in enumerate(model.get_decoder().layers):
        stitch = getattr(layer, "stitches", None)
        if stitch is None:
            continue
        kind = "experts_into_hub" if stitch.merge_into_hub else "hub_into_experts"
        proj_identity = all(
            torch.equal(p.weight, torch.eye(p.weight.shape[0], dtype=p.weight.dtype))
            for p in stitch.w_proj
        )
        gates_zero = all(bool((g.weight == 0).all()) for g in stitch.w_gate)
        stitches.append(
            {
                "after_layer": index,
                "kind": kind,
                "init_proj_identity": proj_identity,
                "init_gates_zero": gates_zero,
                "gate_bias": any(g.bias is not None for g in stitch.w_gate),
                "dropout": stitch.dropout.p,
            }
        )
        if not stitch.merge_into_hub:  # w_gate[0] (the hub's) is never read in Eq. 4
            unused += stitch.w_gate[0].weight.numel()
    return {"stitches": stitches, "trainable_but_unused": unused}


def check_mixturekit(model, hub: Path, spokes: list[tuple[str, Path]], rows: np.ndarray) -> str:
    """Before any comparison: every stream of the MixtureKit model holds its constituent's
    weights (embedding and every block; the hub's final norm and head), and, on held-out rows,
    each stream after block 0 (MixtureKit never stitches after block 0) equals that
    constituent's own hidden state there."""
    decoder = model.get_decoder()
    compared = 0

    def same(mine: dict, theirs: dict, what: str) -> None:
        nonlocal compared
        for key, tensor in theirs.items():
            if not torch.equal(mine[key], tensor):
                raise RuntimeError(f"MixtureKit's {what} differs from its source at {key}")
            compared += 1

    sources = [("hub", load_causal_lm(hub))] + [(n, load_causal_lm(p)) for n, p in spokes]
    hub_model = sources[0][1]
    same(
        decoder.embed_tokens.state_dict(),
        hub_model.model.embed_tokens.state_dict(),
        "hub embedding",
    )
    same(decoder.norm.state_dict(), hub_model.model.norm.state_dict(), "hub final norm")
    same(model.lm_head.state_dict(), hub_model.lm_head.state_dict(), "LM head")
    for b, layer in enumerate(hub_model.model.layers):
        # the hub's block carries its stitch layer as an extra submodule
        mine = {k: v for k, v in decoder.layers[b].state_dict().items() if "stitches" not in k}
        same(mine, layer.state_dict(), f"hub block {b}")
    for slot, (name, expert) in enumerate(sources[1:]):
        embed = decoder.expert_embed_tokens[slot].state_dict()
        same(embed, expert.model.embed_tokens.state_dict(), f"'{name}' embedding")
        for b, layer in enumerate(expert.model.layers):
            same(
                decoder.expert_layers[b][slot].state_dict(),
                layer.state_dict(),
                f"'{name}' block {b}",
            )

    ids = torch.from_numpy(np.asarray(rows[:2]).astype(np.int64))
    captured = {}
    handle = decoder.layers[0].register_forward_hook(
        lambda module, args, output: captured.setdefault("out", output)
    )
    try:
        with torch.inference_mode():
            model.eval()
            model(input_ids=ids, use_cache=False)
            width = model.config.hidden_size
            streams = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
            worst = 0.0
            for slot, (name, source) in enumerate(sources):
                own = source(input_ids=ids, output_hidden_states=True).hidden_states[1]
                gap = float((streams[..., slot * width : (slot + 1) * width] - own).abs().max())
                worst = max(worst, gap)
                if gap > 1e-4:
                    raise RuntimeError(
                        f"MixtureKit's '{name}' stream after block 0 is off by {gap}"
                    )
    finally:
        handle.remove()
    return f"{compared} tensors equal, streams after block 0 match (max |diff| {worst:.1e})"


def build_bts(run, seed: int = 0):
    """bts's own stitch layers, built like the run's stitch stage at training seed `seed`."""
    model = build_stitched(run, with_train_seed(run.config, seed))
    count = model.train_only()
    return model, count


def train_stage(model, batches, run, seed: int, steps: int, tag: str) -> dict:
    """bts's shipped recipe: the stitch stage's own loop and schedule (`bts.train.train` with
    `stitch.train`, seed `seed`), on the shared batches."""
    cfg = with_train_seed(run.config, seed).stitch.train.model_copy(update={"steps": steps})
    log(f"{tag}: the stitch stage's recipe, lr {cfg.lr:g}, warm-up {cfg.warmup_steps} steps")
    with tempfile.TemporaryDirectory(prefix="peer_stage_") as tmp:
        result = train(model, lambda step: batches[step], cfg, Path(tmp), name=tag)
    model.eval()
    return {"seconds": result.seconds, "final_loss": result.final_loss, "lr": cfg.lr}


# --- the loop and the scores --------------------------------------------------------------------


def train_plain(model, params, batches, lr: float, betas, eps: float, tag: str) -> dict:
    """The one loop both systems train with: AdamW, 10% warm-up, cosine to 0, clip 1.0."""
    steps = len(batches)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0)
    warmup = int(round(0.1 * steps))
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    model.train()
    start = last = time.perf_counter()
    losses = []
    for step, batch in enumerate(batches):
        logits = model(input_ids=batch, use_cache=False).logits
        loss = causal_lm_loss(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS or step + 1 == steps:
            last = now
            done = now - start
            eta = done / (step + 1) * (steps - step - 1)
            recent = sum(losses[-10:]) / len(losses[-10:])
            log(
                f"{tag}: step {step + 1}/{steps}, loss {recent:.4f} (mean of last "
                f"{len(losses[-10:])}), {_duration(done)}, eta {_duration(eta)}"
            )
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, steps),
        "first_loss": losses[0] if losses else math.nan,
        "final_loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "warmup_steps": warmup,
    }


def score(model, held: dict[str, np.ndarray], run) -> dict[str, float]:
    """Token-weighted mean next-token loss per held-out set (float64 sums; what the report
    uses: bts.evaluate.held_out_loss on the first eval.max_sequences rows), eval mode."""
    e = run.config.eval
    return {
        d: held_out_loss(model, rows, e.batch_size, e.max_sequences).loss
        for d, rows in held.items()
    }


def with_average(row: dict[str, float], real: list[str]) -> dict[str, float]:
    values = [row[d] for d in real if d in row]
    return {**row, "average": sum(values) / len(values) if values else math.nan}


# --- the table ----------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return mean, sd


def summarise(per_seed: dict[int, dict[str, float]], columns: list[str]) -> dict:
    seeds = sorted(per_seed)
    out = {"mean": {}, "sd": {}}
    for c in columns:
        out["mean"][c], out["sd"][c] = mean_sd([per_seed[s][c] for s in seeds])
    return out


def verdicts(mk: dict, ours: dict, columns: list[str], name: str = "bts") -> dict:
    """Per column: mean and sd of the paired per-seed differences MixtureKit - bts; a winner
    only where |mean| > 2 sd (a tie otherwise, and always with a single seed)."""
    seeds = sorted(mk)
    out = {}
    for c in columns:
        diffs = [mk[s][c] - ours[s][c] for s in seeds]
        mean, sd = mean_sd(diffs)
        lower = "mixturekit" if mean < 0 else name if mean > 0 else "neither"
        decided = not math.isnan(sd) and abs(mean) > 2 * sd
        out[c] = {
            "diffs_mixturekit_minus_bts": diffs,
            "mean_diff": mean,
            "sd_diff": sd,
            "lower": lower,
            "exceeds_2sd": decided,
            "verdict": lower if decided else "tie",
        }
    return out


def print_table(rows: list[tuple[str, dict, dict | None]], columns: list[str]) -> None:
    width = max(len(name) for name, _, _ in rows) + 2
    cell = 17
    print(f"{'system':<{width}}" + "".join(f"{c:>{cell}}" for c in columns))
    for name, values, sds in rows:
        cells = []
        for c in columns:
            v = values.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append(f"{'-':>{cell}}")
            elif sds is None:
                cells.append(f"{v:>{cell}.4f}")
            else:
                sd = sds.get(c, math.nan)
                text = f"{v:.4f} ± {sd:.4f}" if not math.isnan(sd) else f"{v:.4f} ± n/a"
                cells.append(f"{text:>{cell}}")
        print(f"{name:<{width}}" + "".join(cells))


# --- main ---------------------------------------------------------------------------------------


def score_untrained(run, held, real) -> tuple[dict, dict]:
    """Seed, every expert (on every set) and the run's own stitched stage, as they are."""
    rows = {"seed": with_average(score(load_causal_lm(run.path("seed")), held, run), real)}
    experts = {
        d: with_average(score(load_causal_lm(run.path("experts", d)), held, run), real)
        for d in run.config.expert_domains
    }
    own = {d: experts[d][d] for d in run.config.expert_domains if d in held}
    rows["experts_own_domain"] = with_average(own, real)
    stitched = StitchedModel.from_pretrained(run.path("stitched"))
    rows["bts_stitched_stage"] = with_average(score(stitched, held, run), real)
    return rows, experts


def prepare(run, held, real, rows, experts, hub, spokes, mk_dir: Path) -> dict:
    """Build MixtureKit's checkpoint once, check it, and score both systems at initialisation."""
    layers = load_causal_lm(hub).config.num_hidden_layers
    mk_cfg = mixturekit_config(hub, spokes, layers)
    build_mixturekit_checkpoint(mk_cfg, mk_dir)
    mk_model, mk_trainable = load_mixturekit(mk_dir)
    layout = mixturekit_layout(mk_model)
    check = check_mixturekit(mk_model, hub, spokes, next(iter(held.values())))
    log(f"MixtureKit holds the constituents: {check}")
    rows["mixturekit_init"] = with_average(score(mk_model, held, run), real)
    bts_model, bts_trainable = build_bts(run)
    placement = [{"after_layer": p.after_layer, "kind": p.kind} for p in bts_model.placement]
    rows["bts_init"] = with_average(score(bts_model, held, run), real)
    hub_row = rows["seed"] if run.config.stitch.hub == "seed" else experts[run.config.stitch.hub]
    init_gap = max(abs(rows["bts_init"][c] - hub_row[c]) for c in held)
    print(
        f"trainable parameters: mixturekit {mk_trainable:,} "
        f"({layout['trainable_but_unused']:,} of them hub gates of hub-into-experts layers, "
        f"never read), bts {bts_trainable:,}"
    )
    mk_places = ", ".join(f"{s['kind']}@{s['after_layer']}" for s in layout["stitches"])
    bts_places = ", ".join(f"{p['kind']}@{p['after_layer']}" for p in placement)
    print(f"stitches: mixturekit {mk_places}; bts {bts_places}")
    print(
        f"at initialisation (stitch.init {run.config.stitch.init}): bts average "
        f"{rows['bts_init']['average']:.4f} (max |diff| to the hub over the sets {init_gap:.2e}), "
        f"mixturekit {rows['mixturekit_init']['average']:.4f}, hub {hub_row['average']:.4f}",
        flush=True,
    )
    return {
        "mixturekit": {"config": mk_cfg, "trainable": mk_trainable, **layout},
        "bts": {
            "trainable": bts_trainable,
            "placement": placement,
            "gate_dropout": run.config.stitch.gate_dropout,
            "gate_gain": run.config.stitch.gate_gain,
            "init": run.config.stitch.init,
            "initial_gap_to_hub": init_gap,
        },
        "mixturekit_check": check,
    }


SYSTEMS = {
    "stage": ["bts_stage"],
    "plain": ["bts_plain_loop"],
    "both": ["bts_stage", "bts_plain_loop"],
    "none": [],  # MixtureKit alone (choosing its learning rate on --split validation)
}


def train_seeds(run, held, real, mk_dir: Path, seeds, steps: int, lr: float, ours: list[str]):
    """Per training seed: one list of batches, every system trained on it, then scored."""
    train_cfg = run.config.stitch.train
    per_seed = {name: {} for name in ["mixturekit", *ours]}
    training = {name: {} for name in per_seed}
    for s in seeds:
        batches = training_batches(run, s, steps)
        log(f"seed {s}: {steps} batches of {tuple(batches[0].shape)}")
        for system in per_seed:
            tag = f"seed {s} {system}"
            torch.manual_seed(s)  # dropout masks: a function of the training seed
            if system == "bts_stage":
                model, _ = build_bts(run, s)
                training[system][s] = train_stage(model, batches, run, s, steps, tag)
            else:
                if system == "mixturekit":
                    model, _ = load_mixturekit(mk_dir)
                    params = [p for n, p in model.named_parameters() if "stitch" in n]
                else:
                    model, _ = build_bts(run, s)
                    params = [p for p in model.parameters() if p.requires_grad]
                training[system][s] = train_plain(
                    model, params, batches, lr, train_cfg.betas, train_cfg.eps, tag
                )
            per_seed[system][s] = with_average(score(model, held, run), real)
            log(f"{tag}: held-out average {per_seed[system][s]['average']:.4f}")
    return per_seed, training


LABELS = {"bts_stage": "bts (its stitch stage's recipe)", "bts_plain_loop": "bts-plain-loop"}


def print_results(run, rows, summaries, compare, columns, steps, lr, seeds) -> None:
    print(
        f"\nheld-out loss (first {run.config.eval.max_sequences} test rows per set, "
        f"token-weighted), run {run.root}; {steps} steps, mixturekit lr {lr:g}, seeds {seeds}"
    )
    table = [
        ("seed", rows["seed"], None),
        ("expert (own domain)", rows["experts_own_domain"], None),
        ("bts stitched stage (run's)", rows["bts_stitched_stage"], None),
        ("mixturekit (init)", rows["mixturekit_init"], None),
        *((LABELS.get(n, n), v["mean"], v["sd"]) for n, v in summaries.items()),
    ]
    print_table(table, columns)
    for ours, verdict in compare.items():
        print()
        for c in columns:
            v = verdict[c]
            sd = "n/a" if math.isnan(v["sd_diff"]) else f"{v['sd_diff']:.4f}"
            if v["verdict"] == "tie":
                why = "single seed" if math.isnan(v["sd_diff"]) else "|diff| <= 2 sd"
                text = f"tie ({why}; {v['lower']} lower on average)"
            else:
                text = f"{v['lower']} lower, beyond 2 sd"
            print(f"{c}: mixturekit - {LABELS[ours]} = {v['mean_diff']:+.4f} (sd {sd}): {text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="default: stitch.train.steps")
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="MixtureKit's (and the plain loop's)"
    )
    parser.add_argument(
        "--bts",
        choices=sorted(SYSTEMS),
        default="stage",
        help="bts trained by its stitch stage's recipe, by the shared plain loop, or both",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="rows scored: the report's test rows, or validation rows (to choose --lr)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/peer_mixturekit.json")
    args = parser.parse_args()
    try:
        import MixtureKit
    except ImportError:
        print(MISSING)
        return 2

    quiet_libraries()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    started = time.perf_counter()
    run = load_run(args.run_dir)
    steps = args.steps or run.config.stitch.train.steps
    held = held_out_sets(run, validation=args.split == "validation")
    real = [d for d in held if d != SWITCH]
    columns = [*held, "average"]
    hub, spokes = constituents(run)
    log(f"run {run.root}: hub {hub.name}, spokes {[n for n, _ in spokes]}, sets {list(held)}")

    rows, experts = score_untrained(run, held, real)
    log(f"scored the seed, the experts and the run's stitched stage ({_elapsed(started)})")
    with tempfile.TemporaryDirectory(prefix="peer_mixturekit_") as tmp:
        mk_dir = Path(tmp) / "model"
        systems = prepare(run, held, real, rows, experts, hub, spokes, mk_dir)
        per_seed, training = train_seeds(
            run, held, real, mk_dir, seeds, steps, args.lr, SYSTEMS[args.bts]
        )

    summaries = {k: summarise(v, columns) for k, v in per_seed.items()}
    compare = {
        ours: verdicts(per_seed["mixturekit"], per_seed[ours], columns, LABELS[ours])
        for ours in SYSTEMS[args.bts]
    }
    print_results(run, rows, summaries, compare, columns, steps, args.lr, seeds)

    train_cfg, e = run.config.stitch.train, run.config.eval
    result = {
        "run": str(run.root),
        "command": sys.argv,
        "versions": {
            "mixturekit": version("mixturekit"),
            "mixturekit_file": MixtureKit.__file__,
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "protocol": {
            "seeds": seeds,
            "steps": steps,
            "lr": args.lr,
            "betas": list(train_cfg.betas),
            "eps": train_cfg.eps,
            "weight_decay": 0.0,
            "warmup_steps": int(round(0.1 * steps)),
            "schedule": "linear warm-up, cosine to 0 (get_cosine_schedule_with_warmup)",
            "max_grad_norm": 1.0,
            "batch_size": run.config.stitch.batch_size,
            "seq_len": run.config.data.seq_len,
            "stitch_domains": run.config.stitch_domains,
            "mix": run.config.stitch.mix.model_dump(),
            "threads": args.threads,
            "held_out_rows": e.max_sequences,
            "split": args.split,
            "held_out_sets": list(held),
        },
        **systems,
        "losses": {
            **rows,
            "experts": experts,
            **{k: {"per_seed": per_seed[k], **summaries[k]} for k in per_seed},
        },
        "comparison": compare,
        "training": training,
        "seconds": time.perf_counter() - started,
    }
    out_path = args.out or run.path("peer_mixturekit.json")
    write_json(out_path, result)
    print(f"\nnumbers: {out_path} ({_elapsed(started)} in all)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
