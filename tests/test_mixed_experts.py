"""Experts of another width, depth or family than the hub's (docs/bring-your-own.md): d_0 x d_i
projections, stitch points at the same relative depth, and every path (loop, heads, caches,
speculative decoding, save/load, export, add/remove) on a mixed set."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, batch, randomise_stitches, tiny_model
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from bts import BtsError, StitchedModel
from bts.arch import adapter
from bts.hf import BtsStitchedForCausalLM
from bts.models import position_ids
from bts.spec import StitchPoint, StitchSpec, depth_map
from bts.stitch_io import MANIFEST

# the hub is TINY's Llama (d 32, 4 layers); "wide" a Qwen2 of d 48 and 6 layers, "narrow" an
# untied Llama of d 16 and 2 layers: neither can be the identity of the hub's blocks or width
WIDE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=6)
NARROW = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1,
)


def constituents(sharp: bool = False) -> tuple:
    extra = {"initializer_range": 0.2} if sharp else {}  # attention far from uniform
    hub = tiny_model("llama-untied", 0, **extra)
    wide = tiny_model("qwen2-untied", 1, **WIDE, **extra)
    narrow = tiny_model("llama-untied", 2, **NARROW, **extra)
    return hub, {"wide": wide, "narrow": narrow}


def mixed(sharp: bool = False, **spec) -> StitchedModel:
    """Hub + wide + narrow with two stitches (after hub blocks 1 and 3: the narrow expert's two
    blocks take one each); the loop, as the batched path cannot stack them."""
    hub, experts = constituents(sharp)
    return StitchedModel(hub, experts, StitchSpec(**{"gate_dropout": 0.0, **spec}).resolve(4, 2))


def trained(**spec) -> StitchedModel:
    model = mixed(sharp=True, **spec)
    randomise_stitches(model, seed=1)
    return model.eval()


def hub_logits(model, ids, mask):
    return model.hub(ids, attention_mask=mask, position_ids=position_ids(ids, mask)).logits


@pytest.mark.parametrize("output", ["hub", "mixture"])
def test_a_mixed_set_is_exactly_the_hub_at_initialisation(output):
    model = mixed(output=output).eval()
    assert model.depth_maps == {"wide": (2, 5), "narrow": (0, 1)}
    assert model.expert_depths == {"wide": 6, "narrow": 2}  # the last point reads the last
    shapes = {n: tuple(p.weight.shape) for n, p in model.stitches["1"].proj.items()}
    assert shapes == {"wide": (48, 32), "narrow": (16, 32)}  # hub-into-experts: d_0 -> d_i
    assert tuple(model.stitches["3"].proj["narrow"].weight.shape) == (32, 16)
    assert "hidden_size differs" in model.batched_reason  # falls back to the loop
    ids, mask = batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        hub = hub_logits(model, ids, mask)
    if output == "mixture":  # the output stitch returns log-probabilities
        hub = hub.float().log_softmax(-1)
    assert torch.equal(logits, hub)


def test_the_rectangular_init_is_the_identity_on_shared_dimensions():
    model = mixed()
    into_hub = model.stitches["3"].proj["wide"].weight  # d_i = 48 -> d_0 = 32
    assert torch.equal(into_hub, torch.eye(32, 48))
    round_trip = into_hub @ model.stitches["1"].proj["wide"].weight  # hub -> wide -> hub
    assert torch.equal(round_trip, torch.eye(32))


def test_a_few_steps_lower_the_loss_and_touch_only_stitch_parameters():
    model = mixed(sharp=True).train()
    model.train_only()
    optimiser = torch.optim.Adam(model.stitch_parameters(), lr=1e-2)
    ids, mask = batch(rows=4, length=16)
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in [*model.hub.parameters(), *model.experts.parameters()])
    for name in model.expert_names:  # every expert's projections learn (they get gradient)
        grads = [p.grad for p in model.stitch_parameters(name)]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_save_load_and_export_keep_the_logits(tmp_path):
    model = trained(output="mixture")
    for name, m in {"hub": model.hub, **model.experts}.items():
        m.save_pretrained(tmp_path / name)
        m.name_or_path = str(tmp_path / name)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "stitched")
    loaded = StitchedModel.from_pretrained(tmp_path / "stitched").eval()
    assert loaded.depth_maps == model.depth_maps and loaded.spec == model.spec
    BtsStitchedForCausalLM.from_stitched(loaded).save_pretrained(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(exported, BtsStitchedForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)
        # without a cache: the cached forward's attention rounds differently (test_export)
        assert torch.equal(exported(ids, attention_mask=mask, use_cache=False).logits, expected)


@pytest.mark.parametrize("output", ["hub", "mixture"])
def test_cached_generation_equals_uncached_and_speculative_equals_plain(output):
    model = trained(output=output)
    ids, mask = batch(rows=2, length=7)
    plain = dict(max_new_tokens=6, assistant_model=None)
    cached = model.generate(ids, attention_mask=mask, **plain)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **plain))
    one = model.generate(ids[1:], max_new_tokens=8, assistant_model=None)
    drafted = model.generate(ids[1:], max_new_tokens=8, assistant_model="hub",
                             num_assistant_tokens=3)
    assert torch.equal(drafted, one)


def test_removing_an_expert_equals_a_model_built_without_it():
    model = trained()
    model.remove_expert("narrow")
    hub, experts = constituents(sharp=True)
    alone = StitchedModel(hub, {"wide": experts["wide"]}, model.spec).eval()
    alone.stitches.load_state_dict(model.stitches.state_dict())
    assert model.depth_maps == alone.depth_maps == {"wide": (2, 5)}
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits,
                           alone(ids, attention_mask=mask).logits)


def test_an_added_expert_of_another_size_leaves_the_output_unchanged():
    model = trained()
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        model.add_expert("mid", tiny_model("llama-tied", 5, hidden_size=24,
                                           intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=3, num_key_value_heads=1))
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert model.depth_maps["mid"] == (1, 2)  # round(2 * 3 / 4) - 1, round(4 * 3 / 4) - 1


def test_another_vocabulary_is_refused_in_one_line():
    hub = tiny_model("llama-untied")
    with pytest.raises(BtsError, match="expert 'odd' has vocabulary size 120 but the hub has 101"
                                       r".*hub's tokenizer") as err:
        StitchedModel.from_models(hub, {"odd": tiny_model("qwen2-untied", 1, vocab_size=120)})
    assert "\n" not in str(err.value)


def test_the_same_relative_depth_and_its_refusal():
    points = [StitchPoint(a, "experts_into_hub") for a in range(4)]
    assert depth_map(points, 4, 4) == [0, 1, 2, 3]  # the identity for the hub's depth
    assert depth_map(points, 4, 8) == [1, 3, 5, 7]
    assert depth_map(points[1::2], 4, 2) == [0, 1]
    assert depth_map(points, 4, 6) == [1, 2, 4, 5]  # 1.5 and 4.5 round up
    hub = tiny_model("llama-untied")
    with pytest.raises(BtsError, match=r"has layers 2 but the hub has 4: .* blocks 0 and 0 .*"
                                       r"num_stitches.*depth_maps\['n'\]"):
        StitchedModel.from_models(hub, {"n": tiny_model("llama-untied", 1, **NARROW)})


def test_an_explicit_depth_map_round_trips_and_is_checked(tmp_path):
    assert mixed(depth_maps={"wide": [0, 4]}).expert_depths["wide"] == 5  # block 5 never runs
    assert mixed(depth_maps={"wide": [0, 4]}, output="mixture").expert_depths["wide"] == 6
    assert hash(StitchSpec(depth_maps={"wide": [0, 4]}))  # a spec stays hashable
    model = mixed(depth_maps={"wide": [0, 5]})
    assert model.depth_maps["wide"] == (0, 5) and model.depth_maps["narrow"] == (0, 1)
    randomise_stitches(model, seed=2)
    for name, m in {"hub": model.hub, **model.experts}.items():
        m.save_pretrained(tmp_path / name)
        m.name_or_path = str(tmp_path / name)
    model.save_pretrained(tmp_path / "stitched")
    info = json.loads((tmp_path / "stitched" / MANIFEST).read_text())
    assert info["depth_maps"] == {"wide": [0, 5]}
    loaded = StitchedModel.from_pretrained(tmp_path / "stitched").eval()
    assert loaded.spec.depth_maps == {"wide": (0, 5)} and loaded.depth_maps == model.depth_maps
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits,
                           model.eval()(ids, attention_mask=mask).logits)
    for bad, problem in [([5, 0], "strictly increasing"), ([0], "not a list of 2")]:
        info["depth_maps"] = {"wide": bad}
        (tmp_path / "stitched" / MANIFEST).write_text(json.dumps(info))
        with pytest.raises(BtsError, match=f"depth_maps.wide' is .*{problem}"):
            StitchedModel.from_pretrained(tmp_path / "stitched")
    info["depth_maps"] = {"wide": [0, 4]}  # valid, but the weights were trained for [0, 5]
    (tmp_path / "stitched" / MANIFEST).write_text(json.dumps(info))
    with pytest.raises(BtsError, match="edited after saving"):
        StitchedModel.from_pretrained(tmp_path / "stitched")
    with pytest.raises(BtsError, match=r"depth map \[0, 6\].*0\.\.5"):
        mixed(depth_maps={"wide": [0, 6]})
    with pytest.raises(BtsError, match="names 'gone', which is not among the experts"):
        mixed(depth_maps={"gone": [0, 1]})


def test_removing_an_expert_drops_its_explicit_map():
    model = mixed(depth_maps={"wide": [0, 5]})
    model.remove_expert("wide")
    assert model.spec.depth_maps == {} and "wide" not in model.depth_maps
    model.add_expert("wide", tiny_model("qwen2-untied", 1, **WIDE), depth_map=[1, 4])
    assert model.spec.depth_maps == {"wide": (1, 4)}


FAMILIES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 4}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": 4}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_fit_the_adapters_exactly(family):
    """As the hub, the stitched model at initialisation is the family's own forward (sqrt(d)
    embeddings, own norms, soft-capped logits, per-kind rotary tables, sliding windows: 9
    tokens over a window of 4); as an expert it leaves a Llama hub's output unchanged."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**{**TINY, "head_dim": 8, "initializer_range": 0.2, **extra})
    other = model_cls(config).eval()
    llama = tiny_model("llama-untied", 1, **NARROW)
    ids, mask = batch(length=9)
    for hub, expert in [(other, llama), (tiny_model("llama-untied"), other)]:
        model = StitchedModel.from_models(hub, {"x": expert}, num_stitches=2).eval()
        assert model.batched_reason is not None  # the kernels cover the Llama layout only
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, hub_logits(model, ids, mask))
    assert type(adapter(other, "hub")).__name__.lower().startswith(family)
    out = StitchedModel.from_models(other, {"x": llama}, num_stitches=2).generate(
        ids[1:], max_new_tokens=5, pad_token_id=0)
    assert torch.equal(out, other.generate(ids[1:], max_new_tokens=5, do_sample=False,
                                           pad_token_id=0))
