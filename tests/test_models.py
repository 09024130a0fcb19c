"""Constituent loading, hashing and freezing."""

from __future__ import annotations

import pytest
import torch

from bts import BtsError
from bts.models import freeze_output_space, load_causal_lm, weights_sha256


def test_weights_hash_is_stable_and_sees_every_change(make_model, tmp_path):
    model = make_model("llama-tied")
    model.save_pretrained(tmp_path / "m")
    assert weights_sha256(load_causal_lm(tmp_path / "m")) == weights_sha256(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert weights_sha256(load_causal_lm(tmp_path / "m")) != weights_sha256(model)


def test_freeze_output_space_freezes_embeddings_norm_and_head_only(make_model):
    for arch in ("llama-tied", "qwen2-untied"):
        model = make_model(arch)
        freeze_output_space(model)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        expected = {"model.embed_tokens.weight", "model.norm.weight"}
        if arch == "qwen2-untied":
            expected.add("lm_head.weight")
        assert frozen == expected


def test_loading_bad_model_directories_is_one_clear_error(make_model, tmp_path):
    with pytest.raises(BtsError, match="model not found"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BtsError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    make_model("llama-tied").save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BtsError, match="cannot load model"):
        load_causal_lm(tmp_path / "corrupt")
