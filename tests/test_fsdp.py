"""FSDP2 on CPU: two gloo processes launched by `accelerate launch` with
configs/accelerate/fsdp-cpu.yaml against one process (tests/fsdp_worker.py does the FSDP side),
and the choice of FSDP units."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from ddp_worker import batches, trainable
from fsdp_worker import FSDP_CFG, LAYERS, STOP, probe_batch, tiny_lm, tiny_stitched

from bts.distributed import fsdp_plugin, fsdp_units
from bts.errors import BtsError
from bts.stitch import StitchLayer
from bts.train import train

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch has no gloo backend: the FSDP test runs two CPU processes over gloo",
)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def checkpoint_shapes(run: Path) -> dict:
    files = ("model.safetensors", "optimizer.safetensors")
    return {f: {k: t.shape for k, t in safetensors.torch.load_file(run / "checkpoint" / f).items()}
            for f in files}  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """The two-process run: each rank's weights and records under the returned folder."""
    out = tmp_path_factory.mktemp("fsdp")
    src = str(ROOT / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    config = ROOT / "configs" / "accelerate" / "fsdp-cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", "0", str(Path(__file__).with_name("fsdp_worker.py")), str(out)]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, timeout=300)
    return out


def test_fsdp_two_processes_match_one_and_resume_exactly(fsdp_run, tmp_path, one_thread):
    ranks = [safetensors.torch.load_file(fsdp_run / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # every rank: full weights
    part = {k.removeprefix("full."): v for k, v in ranks[0].items() if k.startswith("full.")}
    resumed = {k.removeprefix("resumed."): v for k, v in ranks[0].items() if k.startswith("resumed.")}

    model = tiny_stitched()
    train(model, batches(), FSDP_CFG, tmp_path / "single")
    single = trainable(model)
    print(f"\nFSDP (2 ranks) vs one process after {FSDP_CFG.steps} steps: max abs "
          f"{max_diff(part, single):.3g}; resumed vs uninterrupted: {max_diff(resumed, part):.3g}")
    assert max_diff(part, single) <= 1e-5
    assert max_diff(resumed, part) == 0  # the same shards, full-tensor checkpoint in between
    model.eval()
    with torch.no_grad():  # the model handed back, frozen weights included, is the trained one
        logits = model(input_ids=probe_batch()).logits
    torch.testing.assert_close(ranks[0]["logits"], logits, rtol=0, atol=1e-5)

    # on disk the FSDP checkpoint is the single-process one: full tensors, same names
    assert checkpoint_shapes(fsdp_run / "full") == checkpoint_shapes(tmp_path / "single")


def test_fsdp_trains_a_plain_causal_lm_as_one_process_does(fsdp_run, tmp_path, one_thread):
    """What the expert stages train: every weight trainable, embeddings tied."""
    rank0 = safetensors.torch.load_file(fsdp_run / "rank0.safetensors")
    fsdp = {k.removeprefix("lm."): v for k, v in rank0.items() if k.startswith("lm.")}
    model = tiny_lm()
    train(model, batches(), FSDP_CFG, tmp_path / "lm")
    assert max_diff(fsdp, trainable(model)) <= 1e-5
    assert json.loads((fsdp_run / "rank0.json").read_text())["lm_tied"]  # still one tensor


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_run, tmp_path, one_thread):
    """The world size may change on resume: 2 FSDP ranks to STOP steps, 1 process after."""
    shutil.copytree(fsdp_run / "at_stop", tmp_path / "cross")
    model = tiny_stitched()
    train(model, batches(), FSDP_CFG, tmp_path / "cross")
    uninterrupted = tiny_stitched()
    train(uninterrupted, batches(), FSDP_CFG, tmp_path / "single")
    assert max_diff(trainable(model), trainable(uninterrupted)) <= 1e-5


def test_fsdp_shards_frozen_and_stitch_weights_and_hands_back_plain_ones(fsdp_run):
    for r in (0, 1):
        record = json.loads((fsdp_run / f"rank{r}.json").read_text())
        for name, seen in record["shards"].items():  # recorded while train() had it sharded
            rows = seen["full"][0]
            assert seen["dtensor"], name
            assert seen["local"] == [(rows + 1) // 2 if r == 0 else rows // 2, *seen["full"][1:]]
        assert record["after"] == {"classes": [], "dtensors": [], "hooks": 0}


def test_units_are_each_decoder_block_and_stitch_layer():
    model = tiny_stitched()
    units = fsdp_units(model)
    blocks = [*model.hub.model.layers, *(layer for e in model.experts.values()
                                         for layer in e.model.layers)]  # fmt: skip
    assert len(blocks) == 3 * LAYERS
    assert units == [*model.hub.model.layers, *model.experts["e0"].model.layers,
                     *model.experts["e1"].model.layers, *model.stitches.values()]  # fmt: skip
    assert all(isinstance(u, StitchLayer) for u in units[len(blocks):])
    # no unit inside another: each parameter belongs to one unit or to the root
    owned = [id(p) for u in units for p in u.parameters()]
    assert len(owned) == len(set(owned))


def test_stop_after_leaves_a_resumable_state(fsdp_run):
    state = json.loads((fsdp_run / "at_stop" / "checkpoint" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == STOP and state["world_size"] == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"fsdp_version": 1}, "FSDP2 only"), ({"activation_checkpointing": True}, "checkpoint_frozen")],
)
def test_fsdp_settings_bts_cannot_honour_are_refused(settings, message):
    plugin = SimpleNamespace(**{"fsdp_version": 2, "activation_checkpointing": False, **settings})
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(BtsError, match=message):
        fsdp_plugin(acc)


def test_single_process_and_ddp_get_no_fsdp(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        assert fsdp_plugin(SimpleNamespace(distributed_type=kind)) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for FSDP
    monkeypatch.setenv("FSDP_VERSION", "2")
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no")
    assert isinstance(fsdp_plugin(acc), FullyShardedDataParallelPlugin)
