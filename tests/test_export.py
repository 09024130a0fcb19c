"""`bts export`: a stitched model as a self-contained Hugging Face model directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_stitched
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    pipeline,
)
from typer.testing import CliRunner

from bts import BtsError, StitchedModel
from bts.cli import app
from bts.export import export
from bts.hf import BtsStitchedForCausalLM, StitchedCache

PROMPTS = ["Question: What is 3 + 4?\nAnswer:", "def add(a,", "The quick brown fox jumps over"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    stitched = build_stitched(root)
    return stitched, export(stitched, root / "hf")


@pytest.fixture(scope="module")
def models(exported):
    stitched, out = exported
    memory = StitchedModel.from_pretrained(stitched).eval()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.padding_side = "left"
    return memory, hf, tokenizer


def test_export_is_one_self_contained_directory(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "hf.py", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "bts_export.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bts_stitched"
    assert config["auto_map"]["AutoModelForCausalLM"] == "hf.BtsStitchedForCausalLM"
    assert set(config["expert_configs"]) == {"code", "math"}
    assert config["placement"] == [[1, "hub_into_experts"], [3, "experts_into_hub"]]
    assert config["num_hidden_layers"] == 4  # generate() builds its cache from this
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for prefix in (
        "stitched.hub.",
        "stitched.experts.code.",
        "stitched.experts.math.",
        "stitched.stitches.",
    ):
        assert any(k.startswith(prefix) for k in keys), prefix
    # tied LM heads are stored once, as in any transformers checkpoint
    assert "stitched.hub.lm_head.weight" not in keys


def test_export_gives_the_in_memory_logits_exactly(models):
    memory, hf, _ = models
    assert type(hf) is BtsStitchedForCausalLM  # `import bts` registered it: no remote code
    ids = torch.randint(
        0, hf.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        hub_logits = memory.hub(ids).logits
        expected = memory(ids).logits
        assert not torch.equal(expected, hub_logits)  # the stitches do something
        assert torch.equal(hf(ids).logits, expected)
        labels = hf(ids, labels=ids)
        assert torch.equal(labels.loss, memory(ids, labels=ids).loss)


def test_generate_matches_stitched_generate_and_uses_our_cache(models):
    memory, hf, tokenizer = models
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    ours = memory.generate(ids, max_new_tokens=12)
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(theirs, ours)
    out = hf(ids, use_cache=True)
    assert isinstance(out.past_key_values, StitchedCache)
    assert out.past_key_values.get_seq_length() == ids.shape[1]


def test_pipeline_and_left_padded_batch_equal_single_prompts(models):
    memory, hf, tokenizer = models
    singles = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        singles.append(memory.generate(ids, max_new_tokens=8)[0, ids.shape[1] :])
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][:, 0].eq(0).any()  # really padded
    out = hf.generate(**batch, max_new_tokens=8, do_sample=False)
    for row, single in zip(out[:, batch["input_ids"].shape[1] :], singles, strict=True):
        assert torch.equal(row[: len(single)], single)
    generator = pipeline("text-generation", model=hf, tokenizer=tokenizer, device="cpu")
    texts = generator(PROMPTS, max_new_tokens=8, do_sample=False, batch_size=3)
    for prompt, text, single in zip(PROMPTS, texts, singles, strict=True):
        full = tokenizer(prompt)["input_ids"] + single.tolist()
        assert text[0]["generated_text"] == tokenizer.decode(full, skip_special_tokens=True)


def test_loads_with_trust_remote_code_without_importing_bts(exported, models, tmp_path):
    """A fresh process that never imports bts: refused without remote code, loads with it."""
    _, out = exported
    memory, _, _ = models
    ids = torch.arange(11)[None] % memory.config.vocab_size
    script = f"""
import sys
from safetensors.torch import save_file
import torch
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(out)!r})
    sys.exit("loaded without trust_remote_code")
except ValueError as err:
    assert "trust_remote_code" in str(err), err
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
torch.set_num_threads({torch.get_num_threads()})  # the same reduction order as this process
assert type(model).__module__.startswith("transformers_modules"), type(model)
with torch.no_grad():
    save_file({{"logits": model(torch.arange(11)[None] % {memory.config.vocab_size}).logits}}, {str(tmp_path / "logits.safetensors")!r})
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], memory(ids).logits)


def test_bad_inputs_are_one_clear_error(exported, tmp_path):
    stitched, _ = exported
    with pytest.raises(BtsError, match="bts_stitch.json"):
        export(tmp_path, tmp_path / "out")
    for target in (stitched, stitched.parent / "math", stitched.parent):
        with pytest.raises(BtsError, match="output .* would overwrite"):
            export(stitched, target)
    # a copy whose expert is missing, then changed
    root = tmp_path / "copy"
    shutil.copytree(stitched.parent, root, ignore=shutil.ignore_patterns("hf"))
    shutil.rmtree(root / "math")
    with pytest.raises(BtsError, match="not found"):
        export(root / "stitched", tmp_path / "out")
    shutil.copytree(stitched.parent / "math", root / "math")
    model = AutoModelForCausalLM.from_pretrained(root / "math")
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(root / "math")
    with pytest.raises(BtsError, match="SHA-256"):
        export(root / "stitched", tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "hub" / name).unlink()
    with pytest.raises(BtsError, match="no loadable tokenizer"):
        export(root / "stitched", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["export", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")


def test_failed_export_leaves_the_old_output_intact(exported, tmp_path, monkeypatch):
    stitched, _ = exported
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(stitched), str(out)])
    assert result.exit_code == 0, result.output
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BtsStitchedForCausalLM, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        export(stitched, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no half-written sibling
