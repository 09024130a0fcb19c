"""The stitched-model manifest: every field validated on load, output-affecting ones bound to the
stitch weights by a digest; constituent weights are read from safetensors only, never unpickled."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bts import BtsError, StitchedModel
from bts.models import constituent_entry, load_causal_lm, load_constituent
from bts.stitch_io import DIGEST, FORMAT, MANIFEST, WEIGHTS, read_manifest


def _randomise(model: StitchedModel) -> None:
    """Move every stitch parameter off its initialisation, so gain and names change outputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.stitch_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
            if p.dim() == 1 and p.shape[0] == model.width:
                p.abs_()


def _ids():
    return torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory (hub, experts a and b, stitched) and the logits of the saved model."""
    from helpers import tiny_model

    root = tmp_path_factory.mktemp("run")
    for name, seed in (("hub", 0), ("a", 1), ("b", 2)):
        tiny_model("llama-tied", seed=seed).save_pretrained(root / name)
    model = StitchedModel.from_models(
        load_causal_lm(root / "hub"),
        {"a": load_causal_lm(root / "a"), "b": load_causal_lm(root / "b")},
        num_stitches=2,
        gate_gain=2.0,
    )
    _randomise(model)
    model.save_pretrained(root / "stitched")
    with torch.no_grad():
        logits = model.eval()(_ids()).logits
    return root, logits


@pytest.fixture
def run(saved, tmp_path):
    """A private copy of the run directory that a test may edit."""
    shutil.copytree(saved[0], tmp_path / "run")
    return tmp_path / "run"


def _edit(run, change) -> None:
    path = run / "stitched" / MANIFEST
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info, indent=2))


def _refused(load, match: str) -> str:
    with pytest.raises(BtsError, match=match) as err:
        load()
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(info):
        target = info
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def _delete(*keys):
    def change(info):
        target = info
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_delete("hub"), r"field 'hub' is missing: re-save"),
        (_delete("experts"), r"field 'experts' is missing"),
        (_delete("placement"), r"field 'placement' is missing"),
        (_delete("version"), r"field 'version' is missing"),
        (_delete("gate_dropout"), r"field 'gate_dropout' is missing"),
        (_set("version", 2), r"field 'version' is 2, .*newer bts\? upgrade bts or re-save"),
        (_set("version", True), r"field 'version' is True, .*newer bts"),
        (_set("version", "1"), r"field 'version' is '1', .*newer bts"),
        (_set("hub", "dtype", "Tensor"), r"field 'hub.dtype' is 'Tensor', not one of float32"),
        (_set("experts", "b", "dtype", "float64"), r"field 'experts.b.dtype' is 'float64'"),
        (_set("experts", "a", "dtype", None), r"field 'experts.a.dtype' is None"),
        (_delete("hub", "path"), r"field 'hub.path' is missing"),
        (_delete("experts", "b", "sha256"), r"field 'experts.b.sha256' is missing"),
        (_set("experts", "a", "sha256", 7), r"field 'experts.a.sha256' is 7"),
        (_set("hub", "path", ["hub"]), r"field 'hub.path' is \['hub'\]"),
        (_set("experts", "a", "where", "x"), r"field 'experts.a.where' is not an entry field"),
        (_set("experts", ["a", "b"]), r"field 'experts' is not an object"),
        (_set("hub", "../hub"), r"field 'hub' is not an object"),
        (_set("placement", []), r"field 'placement' is not a non-empty list"),
        (_set("placement", 0, [1]), r"field 'placement\[0\]' is \[1\]"),
        (_set("placement", 1, 0, -1), r"field 'placement\[1\]\[0\]' is -1, not a non-negative"),
        (_set("placement", 0, 0, True), r"field 'placement\[0\]\[0\]' is True"),
        (_set("placement", 0, 0, 1.0), r"field 'placement\[0\]\[0\]' is 1.0"),
        (_set("placement", 0, 0, "1"), r"field 'placement\[0\]\[0\]' is '1'"),
        (_set("placement", 0, 1, "sideways"), r"field 'placement\[0\]\[1\]' is 'sideways', not "),
        (_set("gate_dropout", 1.0), r"field 'gate_dropout' is 1.0, not a number in \[0, 1\)"),
        (_set("gate_dropout", -0.1), r"field 'gate_dropout' is -0.1"),
        (_set("gate_dropout", "0.1"), r"field 'gate_dropout' is '0.1'"),
        (_set("gate_gain", 0), r"field 'gate_gain' is 0, not a finite positive number"),
        (_set("gate_gain", -2.0), r"field 'gate_gain' is -2.0"),
        (_set("gate_gain", float("inf")), r"field 'gate_gain' is inf"),
        (_set("gate_gain", float("nan")), r"field 'gate_gain' is nan"),
        (_set("gate_gain", False), r"field 'gate_gain' is False"),
        (_set("gate_gian", 3.0), r"field 'gate_gian' is not a manifest field: remove it"),
    ],
)
def test_each_bad_field_is_one_line_naming_it(run, change, match):
    _edit(run, change)
    _refused(lambda: StitchedModel.from_pretrained(run / "stitched"), match)
    _refused(lambda: read_manifest(run / "stitched"), match)  # as `bts export` reads it


def test_not_a_manifest_at_all(run):
    (run / "stitched" / MANIFEST).write_text("[1, 2]")
    _refused(lambda: StitchedModel.from_pretrained(run / "stitched"), "is not a bts stitched-model manifest")
    (run / "stitched" / MANIFEST).write_text('{"format": "bts-stitched-model", ')
    _refused(lambda: StitchedModel.from_pretrained(run / "stitched"), "is not valid JSON")


def _swap_names(info):
    a, b = info["experts"]["a"], info["experts"]["b"]
    info["experts"] = {"a": b, "b": a}


def _swap_order(info):
    info["experts"] = {"b": info["experts"]["b"], "a": info["experts"]["a"]}


def _move_stitch(info):
    info["placement"][0][0] = 0  # after block 1 -> after block 0 (a free layer)


def _flip_kind(info):
    after, kind = info["placement"][0]
    info["placement"][0] = [after, "experts_into_hub" if kind != "experts_into_hub" else kind]


@pytest.mark.parametrize(
    "change",
    [
        _set("gate_gain", 1.0),
        _set("gate_dropout", 0.0),
        _swap_names,
        _swap_order,
        _move_stitch,
        _flip_kind,
    ],
    ids=["gate_gain", "gate_dropout", "swap-names", "swap-order", "move-stitch", "flip-kind"],
)
def test_output_affecting_edits_are_refused(run, change, monkeypatch):
    _edit(run, change)
    info = json.loads((run / "stitched" / MANIFEST).read_text())
    read_manifest(run / "stitched")  # every field is still valid on its own
    if change is _flip_kind:
        assert [k for _, k in info["placement"]] == ["experts_into_hub"] * 2

    def never(*args, **kwargs):
        raise AssertionError("a constituent was loaded before the digest was checked")

    monkeypatch.setattr("bts.stitch_io.load_constituent", never)
    message = _refused(
        lambda: StitchedModel.from_pretrained(run / "stitched"),
        r"bts_stitch.json was edited after saving \(gate_gain/names/placement no longer match "
        r"stitch.safetensors\): undo the edit or re-save the stitched model",
    )
    assert str(run / "stitched" / MANIFEST) in message


def test_unedited_model_loads_with_identical_logits(saved, run):
    model = StitchedModel.from_pretrained(run / "stitched")
    with torch.no_grad():
        assert torch.equal(model.eval()(_ids()).logits, saved[1])
    assert model.spec.gate_gain == 2.0 and model.expert_names == ["a", "b"]
    assert DIGEST in _metadata(run)


def test_paths_are_not_in_the_digest(saved, run):
    """A constituent may be found elsewhere (directories move): its SHA-256 still guards it."""
    (run / "a").rename(run / "moved-a")
    _edit(run, _set("experts", "a", "path", "../moved-a"))
    with torch.no_grad():
        assert torch.equal(StitchedModel.from_pretrained(run / "stitched").eval()(_ids()).logits, saved[1])


def _metadata(run) -> dict:
    from safetensors import safe_open

    with safe_open(str(run / "stitched" / WEIGHTS), framework="pt") as f:
        return f.metadata()


def test_a_directory_saved_before_the_digest_still_loads(saved, run):
    weights = load_file(run / "stitched" / WEIGHTS)
    save_file(weights, run / "stitched" / WEIGHTS, metadata={"format": FORMAT})
    assert DIGEST not in _metadata(run)
    with torch.no_grad():
        assert torch.equal(StitchedModel.from_pretrained(run / "stitched").eval()(_ids()).logits, saved[1])
    _edit(run, _set("gate_gain", -1.0))  # its fields are still checked
    _refused(lambda: StitchedModel.from_pretrained(run / "stitched"), "field 'gate_gain' is -1.0")


def test_truncated_stitch_weights_are_one_line(run):
    path = run / "stitched" / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(
        lambda: StitchedModel.from_pretrained(run / "stitched"), "the stitch weights are corrupt; stitch again"
    )


def test_pickled_weights_are_refused_and_never_unpickled(run, monkeypatch):
    model = load_causal_lm(run / "a")
    (run / "a" / "model.safetensors").unlink()
    torch.save(model.state_dict(), run / "a" / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    message = (
        r"has no safetensors weights \(only pytorch_model.bin\): bts never unpickles weight "
        r"files; convert it with `save_pretrained\(..., safe_serialization=True\)`"
    )
    assert str(run / "a") in _refused(lambda: load_causal_lm(run / "a"), message)
    _refused(lambda: StitchedModel.from_pretrained(run / "stitched"), message)  # the expert's directory
    (run / "a" / "pytorch_model.bin").unlink()
    _refused(lambda: load_causal_lm(run / "a"), r"no safetensors weights \(no weight files")


def test_truncated_model_weights_are_one_line(run):
    path = run / "hub" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(
        lambda: load_causal_lm(run / "hub"), r"cannot load model from .*hub \(.*\): re-save it"
    )
    _refused(lambda: StitchedModel.from_pretrained(run / "stitched"), r"cannot load model from .*hub")


def test_constituent_dtypes_are_checked_on_save_and_load(run):
    entry = json.loads((run / "stitched" / MANIFEST).read_text())["hub"]
    bad = {**entry, "dtype": "Tensor"}  # an attribute of torch, but not a dtype
    _refused(
        lambda: load_constituent(run / "stitched", bad, "constituent 'seed'", "then", "redo it"),
        r"constituent 'seed' has dtype 'Tensor' in its manifest, not one of float32, float16, "
        r"bfloat16: redo it",
    )
    model = load_causal_lm(run / "hub").to(torch.float64)
    _refused(
        lambda: constituent_entry(model, "the hub", run / "stitched"),
        r"the hub has dtype float64, which a manifest cannot record",
    )
