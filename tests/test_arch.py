"""Architecture adapters: the registry is the only way in, a new family is one registered
class, and the one shape check names the first field that disagrees."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from bts import BtsError, StitchedModel
from bts.arch import REGISTRY, Adapter, adapter, mismatch, register


@pytest.fixture
def toy_family(make_model):
    """A family bts does not know: Llama blocks under another decoder-layer class name."""
    toy = type("ToyDecoderLayer", (LlamaDecoderLayer,), {})

    def make(seed=0):
        model = make_model("llama-tied", seed=seed)
        for layer in model.model.layers:
            layer.__class__ = toy
        return model

    yield make
    REGISTRY.pop("ToyDecoderLayer", None)


def test_an_unknown_family_is_refused_in_one_line(toy_family):
    with pytest.raises(BtsError, match="ToyDecoderLayer.*add an adapter in bts/arch/"):
        StitchedModel.from_models(toy_family(), {"a": toy_family(1)})


def test_a_new_family_is_one_registered_adapter(toy_family):
    @register
    class ToyAdapter(Adapter):  # the Llama layout's accessors; no batched kernels
        layer_classes = ("ToyDecoderLayer",)

    hub = toy_family()
    model = StitchedModel.from_models(hub, {"a": toy_family(1), "b": toy_family(2)}).eval()
    assert isinstance(adapter(hub, "hub"), ToyAdapter)
    assert "do not cover decoder layer ToyDecoderLayer" in model.batched_reason
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # identity stitches: exactly the hub, through the adapter's blocks
        assert torch.equal(model(ids).logits, hub(ids).logits)
    out = model.generate(ids, max_new_tokens=4)  # the loop decodes with per-model caches
    assert torch.equal(out, hub.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_the_shape_check_names_the_first_field_that_differs(make_model):
    hub = make_model("llama-tied").config
    wider = make_model("llama-tied", intermediate_size=48).config
    assert mismatch(hub, wider, "stitch") is None  # stitching pairs states, not MLP widths
    assert mismatch(hub, wider, "stack")[0] == "intermediate_size"
    assert mismatch(hub, wider, "merge")[0] == "intermediate_size"
    qwen = make_model("qwen2-untied").config
    assert mismatch(hub, qwen, "merge")[0] == "model_type"
