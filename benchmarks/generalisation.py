"""Generalisation: every system of a finished run on real text from outside its domains.

The text is the long description (the README) in the metadata of every Python distribution
installed beside bts, except lm_eval, whose task READMEs the prose domain reads. No domain
reads these files and no setting was chosen on them. Documents are the descriptions, sorted by
distribution name, packed with the run's tokenizer; the first `--rows` rows are scored with the
report's loss (bts.evaluate.held_out_loss). The text's SHA-256 and the distributions are
recorded, since the set depends on what is installed (uv.lock pins it).

    .venv/bin/python benchmarks/generalisation.py runs/demo [--rows 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from importlib.metadata import distributions
from pathlib import Path

import numpy as np

from bts.compare import load_baseline, systems
from bts.data.packing import pack_documents
from bts.data.sources import Document
from bts.evaluate import held_out_loss
from bts.fileio import write_json
from bts.progress import quiet_libraries
from bts.repeat import REPEATS, sample_sd
from bts.stages import Run
from bts.stitch import StitchedModel

EXCLUDED = {"lm_eval", "lm-eval"}  # the prose domain reads lm_eval's task READMEs
MIN_CHARS = 2000


def package_readmes() -> list[Document]:
    """Each installed distribution's long description of at least MIN_CHARS, by name."""
    found = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name and name.lower().replace("_", "-") not in EXCLUDED and len(body) >= MIN_CHARS:
            found[name.lower()] = body
    return [Document(f"readme/{name}", found[name]) for name in sorted(found)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="default RUN/generalisation.json")
    parser.add_argument(
        "--repeats", action="store_true", help="also score RUN/repeats/seed-*/ (bts repeat)"
    )
    args = parser.parse_args()
    quiet_libraries()
    run = Run.load(args.run_dir, lock=False)
    docs = package_readmes()
    digest = hashlib.sha256("\0".join(d.id + "\0" + d.text for d in docs).encode()).hexdigest()
    with tempfile.TemporaryDirectory(prefix="bts-generalisation-") as tmp:
        packed = pack_documents(docs, run.tokenizer, run.config.data.seq_len, tmp, "readmes")
        rows = np.asarray(packed.array[: args.rows]).astype(np.int64)
    batch = run.config.eval.batch_size
    losses = {}
    for name, load, _, _ in systems(run):
        if "-minus:" in name:  # removal rows (bts-minus, bts_heads-minus)
            continue
        losses[name] = held_out_loss(load(), rows, batch).loss
        print(f"{name:<20} {losses[name]:.4f}", flush=True)
    seed = losses["seed"]
    print(f"\n{'system':<20} {'loss':>8} {'vs seed':>9}")
    for name, loss in sorted(losses.items(), key=lambda kv: kv[1]):
        print(f"{name:<20} {loss:>8.4f} {loss - seed:>+9.4f}")
    per_seed = repeated(run, rows, batch, losses) if args.repeats else {}
    out = args.out or run.path("generalisation.json")
    write_json(
        out,
        {
            "text": "long descriptions of installed distributions (importlib.metadata), "
            f"lm_eval excluded, at least {MIN_CHARS} characters",
            "distributions": [d.id.split("/", 1)[1] for d in docs],
            "sha256": digest,
            "rows": int(len(rows)),
            "seq_len": run.config.data.seq_len,
            "loss": losses,
            "per_seed": per_seed,
        },
    )
    print(f"\nnumbers: {out}")
    return 0


def repeated(run: Run, rows: np.ndarray, batch: int, losses: dict) -> dict:
    """Losses of every re-trained system of `bts repeat` (seed 0: the run's own), with mean and
    sd over seeds, printed and returned by system."""
    per_seed: dict[str, dict[str, float]] = {}
    for directory in sorted(run.path(REPEATS).glob("seed-*")):
        seed = directory.name.removeprefix("seed-")
        trained = {"bts": directory / "stitched", "bts_heads": directory / "stitched_heads"}
        trained |= {p.name: p for p in sorted((directory / "baselines").glob("*"))}
        for name, path in trained.items():
            if path.is_dir() and name in losses:
                if path.parent.name == "baselines":
                    model = load_baseline(name, path)
                else:
                    model = StitchedModel.from_pretrained(path)
                per_seed.setdefault(name, {"0": losses[name]})[seed] = held_out_loss(
                    model, rows, batch
                ).loss
    print(f"\n{'system':<20} {'mean':>8} {'sd':>8}  seeds")
    for name, by_seed in sorted(per_seed.items(), key=lambda kv: np.mean(list(kv[1].values()))):
        values = list(by_seed.values())
        print(f"{name:<20} {np.mean(values):>8.4f} {sample_sd(values):>8.4f}  {len(values)}")
    return per_seed


if __name__ == "__main__":
    sys.exit(main())
