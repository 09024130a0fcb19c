"""The FSDP worker that tests/test_fsdp.py launches on CPU with gloo:

    accelerate launch --config_file configs/accelerate/fsdp-cpu.yaml --main_process_port 0 \
        tests/fsdp_worker.py OUT

Each rank trains the same tiny stitched model (a Llama hub and two experts) three ways, and
writes what the test compares: OUT/rank<r>.safetensors holds the stitch weights after an
uninterrupted run ("full.*"), after a run stopped at STOP steps and resumed on the same model
object ("resumed.*"), and that model's logits on a fixed batch; OUT/rank<r>.json records the
local shard shapes seen during training and the model's form after it. Rank 0 copies the
checkpoint at STOP steps to OUT/at_stop for the test to resume single-process. A plain causal
LM with tied embeddings (what the expert stages train: every weight trainable) trains too
("lm.*").
"""

import json
import os
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch
from ddp_worker import batches, trainable
from helpers import stitched, tiny_model
from torch.distributed.tensor import DTensor

from bts import StitchedModel
from bts.train import TrainConfig, train

FSDP_CFG = TrainConfig(steps=4, lr=1e-2, grad_accum=2, warmup_steps=1, log_every=1)
STOP = 2
LAYERS = 2
# one parameter of each kind of unit, and of the root (101 embedding rows: an uneven split)
WATCHED = ("hub.model.layers.0.self_attn.q_proj.weight", "experts.e1.model.layers.1.mlp.up_proj.weight",
           "stitches.0.proj.e0.weight", "hub.model.embed_tokens.weight")  # fmt: skip


def tiny_stitched() -> StitchedModel:
    """A hub and two experts of 2 Llama layers, stitched after each layer; no gate dropout, so
    that runs over different numbers of ranks see the same computation."""
    def make(arch, seed):
        return tiny_model(arch, seed, num_hidden_layers=LAYERS)

    return stitched(make, "llama-untied", num_stitches=LAYERS, gate_dropout=0.0)


def tiny_lm() -> torch.nn.Module:
    return tiny_model("llama-tied", 0, num_hidden_layers=LAYERS).train()


def probe_batch() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))


def spying(model: torch.nn.Module, seen: dict):
    """batch_fn that records, while train() has the model sharded, the watched parameters'
    local shapes."""
    batch_fn = batches()

    def spy(i: int) -> torch.Tensor:
        if not seen:
            params = dict(model.named_parameters())
            for name in WATCHED:
                p = params[name]
                local = p.to_local() if isinstance(p, DTensor) else p
                seen[name] = {"dtensor": isinstance(p, DTensor), "local": list(local.shape),
                              "full": list(p.shape)}  # fmt: skip
        return batch_fn(i)

    return spy


def form(model: torch.nn.Module) -> dict:
    """What train() handed back: plain classes and tensors, or leftovers of FSDP."""
    return {
        "classes": sorted({type(m).__name__ for m in model.modules() if "FSDP" in type(m).__name__}),
        "dtensors": [n for n, p in model.named_parameters() if isinstance(p, DTensor)],
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
    }


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    model, seen = tiny_stitched(), {}
    train(model, spying(model, seen), FSDP_CFG, out / "full", name="fsdp")
    tensors = {f"full.{n}": t for n, t in trainable(model).items()}
    model.eval()
    with torch.no_grad():
        tensors["logits"] = model(input_ids=probe_batch()).logits
    record = {"shards": seen, "after": form(model)}

    again = tiny_stitched()
    train(again, batches(), FSDP_CFG, out / "part", name="fsdp", stop_after=STOP)
    if rank == 0:  # before resuming: the other rank waits in train() for this one
        shutil.copytree(out / "part" / "checkpoint", out / "at_stop" / "checkpoint")
    train(again, batches(), FSDP_CFG, out / "part", name="fsdp")  # the same object, resharded
    tensors.update({f"resumed.{n}": t for n, t in trainable(again).items()})

    lm = tiny_lm()
    train(lm, batches(), FSDP_CFG, out / "lm", name="lm")
    tensors.update({f"lm.{n}": t for n, t in trainable(lm).items()})
    record["lm_tied"] = lm.lm_head.weight is lm.model.embed_tokens.weight
    safetensors.torch.save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
