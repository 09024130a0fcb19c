"""The stitched model: identity at initialisation, paper equations, gradients, modularity, I/O."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import batch, randomise_stitches, same, stitched, trained

from bts import BtsError, StitchedModel, StitchLayer, StitchPoint, default_placement
from bts.stitch import EXPERTS_INTO_HUB, HUB_INTO_EXPERTS


def test_default_placement_follows_the_paper():
    assert default_placement(20, 4) == [
        StitchPoint(4, HUB_INTO_EXPERTS),
        StitchPoint(9, EXPERTS_INTO_HUB),
        StitchPoint(14, HUB_INTO_EXPERTS),
        StitchPoint(19, EXPERTS_INTO_HUB),
    ]
    # 30 layers, 4 stitches: every 7 blocks, the last one always after the final block
    assert [p.after_layer for p in default_placement(30, 4)] == [6, 13, 20, 29]
    assert default_placement(6, 1) == [StitchPoint(5, EXPERTS_INTO_HUB)]


def test_identity_at_initialisation(make_model, arch):
    model = stitched(make_model, arch, num_stitches=2).eval()
    ids, mask = batch()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.hub(ids).logits)
        hub = model.hub(ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], hub[real], rtol=0, atol=1e-6)


def test_identity_holds_in_training_mode_with_gate_dropout(make_model):
    model = stitched(make_model, "llama-tied", gate_dropout=0.5).train()
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.hub(ids).logits)


def test_stitch_layers_reduce_to_paper_equations_at_unit_scale():
    """Gates read the RMS-normalised hub state (docs/stitching.md)."""

    def unit(h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + torch.finfo(h.dtype).eps)

    torch.manual_seed(0)
    width, names = 8, ["a", "b"]
    h0, h = torch.randn(2, 5, width), {n: torch.randn(2, 5, width) for n in names}
    for kind in (EXPERTS_INTO_HUB, HUB_INTO_EXPERTS):
        layer = StitchLayer(kind, width, names, gate_dropout=0.0)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn_like(p))
            for n in names:
                layer.scale[n].fill_(1.0)
        hub, experts, _ = layer(h0, h)
        if kind == EXPERTS_INTO_HUB:  # Eq. 3
            logits = torch.stack([layer.gate[s](unit(h0)) for s in ["hub", *names]])
            g = torch.softmax(logits, dim=0)
            want = g[0] * h0 + sum(g[i + 1] * layer.proj[n](h[n]) for i, n in enumerate(names))
            torch.testing.assert_close(hub, want)
            assert all(torch.equal(experts[n], h[n]) for n in names)
        else:  # Eq. 4
            for n in names:
                s = torch.sigmoid(layer.gate[n](unit(h0)))
                torch.testing.assert_close(experts[n], (1 - s) * h[n] + s * layer.proj[n](h0))
            assert torch.equal(hub, h0)


def test_fresh_stitch_layers_leave_every_stream_untouched():
    torch.manual_seed(0)
    h0, h = torch.randn(2, 5, 8), {"a": torch.randn(2, 5, 8)}
    for kind in (EXPERTS_INTO_HUB, HUB_INTO_EXPERTS):
        hub, experts, _ = StitchLayer(kind, 8, ["a"], gate_dropout=0.0)(h0, h)
        assert torch.equal(hub, h0) and torch.equal(experts["a"], h["a"])


def test_softmax_with_priors_is_finite_when_a_closed_source_dominates():
    """An expert with scale 0 but by far the largest gate logit must not produce 0/0."""
    torch.manual_seed(0)
    h0, h = torch.randn(2, 5, 8), {"a": torch.randn(2, 5, 8), "b": torch.randn(2, 5, 8)}
    layer = StitchLayer(EXPERTS_INTO_HUB, 8, ["a", "b"], gate_dropout=0.0, gate_gain=10.0)
    with torch.no_grad():
        layer.gate["hub"].bias.fill_(-50.0)
        layer.gate["a"].bias.fill_(80.0)  # scale of "a" stays 0: closed
        layer.scale["b"].fill_(0.05)  # "b" open with prior 0.5
    hub, _, gates = layer(h0, h)
    assert torch.isfinite(hub).all() and torch.isfinite(gates).all()
    assert torch.equal(gates[..., 1, :], torch.zeros_like(gates[..., 1, :]))
    torch.testing.assert_close(hub, layer.proj["b"](h["b"]))  # the hub's own weight underflows


def test_one_step_changes_only_stitch_parameters(make_model, arch):
    model = stitched(make_model, arch).train()
    trainable = model.train_only()
    assert trainable == sum(p.numel() for p in model.stitch_parameters())
    frozen_before = {
        n: p.clone() for n, p in model.named_parameters() if not n.startswith("stitches.")
    }
    stitch_before = {n: p.clone() for n, p in model.stitches.named_parameters()}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, _ = batch()
    for _ in range(2):  # step 1 opens the scales, step 2 reaches projections and gates
        optim.zero_grad()
        model(ids, labels=ids).loss.backward()
        optim.step()
    for name, p in model.named_parameters():
        if not name.startswith("stitches."):
            assert p.grad is None, name
            assert torch.equal(p, frozen_before[name]), name
    changed = {
        n for n, p in model.stitches.named_parameters() if not torch.equal(p, stitch_before[n])
    }
    assert any(".scale." in n for n in changed)
    assert any(".proj." in n for n in changed) and any(".gate." in n for n in changed)
    assert not any(model.state_dict(keep_vars=True)[k].requires_grad for k in frozen_before)


def test_loss_follows_transformers_convention(make_model):
    model = stitched(make_model, "llama-tied")
    ids, _ = batch()
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        assert torch.allclose(model(ids, labels=labels).loss, model.hub(ids, labels=labels).loss)


def test_cached_generation_equals_uncached(make_model, arch):
    model = stitched(make_model, arch, num_stitches=2)
    randomise_stitches(model)
    model.eval()
    ids, mask = batch(length=9)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=10, use_cache=False)
    assert cached.shape == (3, 19)
    assert torch.equal(cached, uncached)
    # a left-padded prompt decodes as it would alone
    alone = model.generate(ids[:1, 4:], max_new_tokens=10)
    assert torch.equal(alone[0], cached[0, 4:])


def test_generation_at_initialisation_equals_the_hub(make_model):
    model = stitched(make_model, "llama-tied")
    ids, mask = batch(length=9)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    theirs = model.hub.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(ours, theirs)


def test_gates_are_returned_per_layer_expert_and_token(make_model):
    model = stitched(make_model, "llama-tied", num_stitches=2)
    randomise_stitches(model)
    ids, _ = batch()
    gates = model(ids, return_gates=True).gates
    assert [(g.after_layer, g.kind) for g in gates] == [
        (1, HUB_INTO_EXPERTS),
        (3, EXPERTS_INTO_HUB),
    ]
    assert gates[0].sources == ["e0", "e1"] and gates[0].weights.shape == (3, 12, 2)
    assert gates[1].sources == ["hub", "e0", "e1"] and gates[1].weights.shape == (3, 12, 3)
    torch.testing.assert_close(gates[1].weights.sum(-1), torch.ones(3, 12))
    assert ((gates[0].weights >= 0) & (gates[0].weights <= 1)).all()


def test_removing_an_expert_renormalises_over_the_rest(make_model, arch):
    model = stitched(make_model, arch, n_experts=3).eval()
    randomise_stitches(model)
    ids, mask = batch()
    with torch.no_grad():
        for stitch in model.stitches.values():
            stitch.scale["e1"].zero_()  # weight 0 inside the softmax == not there
        expected = model(ids, attention_mask=mask).logits
        model.remove_expert("e1")
        assert model.expert_names == ["e0", "e2"]
        assert not any("e1" in n for n, _ in model.named_parameters())
        same(model(ids, attention_mask=mask).logits, expected)
    with pytest.raises(BtsError, match="no expert named 'e1'"):
        model.remove_expert("e1")


def test_add_expert_leaves_output_unchanged_and_trains_alone(make_model, arch):
    model = stitched(make_model, arch).eval()
    randomise_stitches(model)
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.add_expert("new", make_model(arch, seed=9))
    with torch.no_grad():
        same(model(ids, attention_mask=mask).logits, before)
    own = model.train_only(expert="new")
    assert own == sum(p.numel() for p in model.stitch_parameters("new")) > 0
    model.train()
    model(ids, labels=ids).loss.backward()
    new_params = {id(p) for p in model.stitch_parameters("new")}
    for name, p in model.named_parameters():
        if id(p) not in new_params:
            assert p.grad is None, name
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.stitch_parameters("new")
    )
    model.remove_expert("new")
    with torch.no_grad():
        same(model.eval()(ids, attention_mask=mask).logits, before)


def test_save_and_load_round_trip(make_model, arch, tmp_path):
    hub, experts = make_model(arch, seed=0), {"a": make_model(arch, seed=1)}
    for name, m in {"hub": hub, **experts}.items():
        m.save_pretrained(tmp_path / name)
    hub = type(hub).from_pretrained(tmp_path / "hub")
    experts = {"a": type(hub).from_pretrained(tmp_path / "a")}
    model = StitchedModel.from_models(hub, experts, num_stitches=2)
    randomise_stitches(model)
    model.save_pretrained(tmp_path / "stitched")
    assert sorted(p.name for p in (tmp_path / "stitched").iterdir()) == [
        ".bts-output",  # the kind of output, so a later save may replace it
        "bts_stitch.json",
        "stitch.safetensors",
    ]
    loaded = StitchedModel.from_pretrained(tmp_path / "stitched")
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(
            loaded.eval()(ids, attention_mask=mask).logits,
            model.eval()(ids, attention_mask=mask).logits,
        )
    assert loaded.placement == model.placement


def test_load_refuses_changed_constituent_and_corrupt_weights(make_model, tmp_path):
    for name, seed in (("hub", 0), ("a", 1)):
        make_model("llama-tied", seed=seed).save_pretrained(tmp_path / name)
    load = type(make_model("llama-tied")).from_pretrained
    model = StitchedModel.from_models(load(tmp_path / "hub"), {"a": load(tmp_path / "a")})
    model.save_pretrained(tmp_path / "stitched")

    changed = load(tmp_path / "a")
    with torch.no_grad():
        changed.model.norm.weight.add_(1.0)
    changed.save_pretrained(tmp_path / "a")
    with pytest.raises(BtsError, match=r"expert 'a' .* changed since it was stitched"):
        StitchedModel.from_pretrained(tmp_path / "stitched")

    model.experts["a"].save_pretrained(tmp_path / "a")  # restore
    (tmp_path / "stitched" / "stitch.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BtsError, match="corrupt"):
        StitchedModel.from_pretrained(tmp_path / "stitched")
    with pytest.raises(BtsError, match="bts_stitch.json not found"):
        StitchedModel.from_pretrained(tmp_path / "nowhere")


def test_save_refuses_constituents_without_a_location(make_model, tmp_path):
    model = stitched(make_model, "llama-tied")
    with pytest.raises(BtsError, match="no saved location"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "what"),
    [
        # another depth is stitched at the same relative depth, where the placement allows it,
        # and another width through d_0 x d_i projections (tests/test_mixed_experts.py)
        ({"num_hidden_layers": 2}, "layers 2 but the hub has 4"),
        ({"vocab_size": 120}, "vocabulary size 120 but the hub has 101"),
    ],
)
def test_mismatched_constituents_are_refused(make_model, override, what):
    hub = make_model("llama-tied")
    with pytest.raises(BtsError, match=f"expert 'odd' has {what}"):
        StitchedModel.from_models(hub, {"odd": make_model("llama-tied", **override)})


def test_other_layouts_and_bad_options_are_refused(make_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    hub = make_model("llama-tied")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=101))
    with pytest.raises(BtsError, match="does not have the Llama layout"):
        StitchedModel.from_models(hub, {"g": gpt2})
    with pytest.raises(BtsError, match="num_stitches=9"):
        StitchedModel.from_models(hub, {}, num_stitches=9)
    with pytest.raises(BtsError, match="no experts-into-hub"):
        StitchedModel.from_models(hub, {}, placement=[(3, HUB_INTO_EXPERTS)])
    with pytest.raises(BtsError, match="not allowed"):
        StitchedModel.from_models(hub, {"a.b": make_model("llama-tied")})


def test_mixed_architectures_with_matching_shapes_stitch(make_model):
    """Mistral experts on a Llama hub: the adapter walks each with its own masks and rotary."""
    model = StitchedModel.from_models(
        make_model("llama-tied"), {"m": make_model("mistral", seed=3)}
    )
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.hub(ids).logits)


def test_manifest_names_constituents_relative_to_the_model(make_model, tmp_path):
    for name, seed in (("hub", 0), ("a", 1)):
        make_model("llama-tied", seed=seed).save_pretrained(tmp_path / "models" / name)
    load = type(make_model("llama-tied")).from_pretrained
    model = StitchedModel.from_models(
        load(tmp_path / "models" / "hub"), {"a": load(tmp_path / "models" / "a")}
    )
    model.save_pretrained(tmp_path / "stitched")
    info = json.loads((tmp_path / "stitched" / "bts_stitch.json").read_text())
    assert info["hub"]["path"] == "../models/hub" and len(info["hub"]["sha256"]) == 64
    # the run directory can move as a whole
    (tmp_path / "moved").mkdir()
    for sub in ("models", "stitched"):
        (tmp_path / sub).rename(tmp_path / "moved" / sub)
    assert StitchedModel.from_pretrained(tmp_path / "moved" / "stitched").expert_names == ["a"]


@pytest.mark.parametrize("name", ["copy", "keys", "pop", "hub", "a.b", ""])
def test_expert_names_that_cannot_be_keys_are_refused(make_model, name):
    model = trained(make_model, "llama-tied", n_experts=1)
    with pytest.raises(BtsError, match="is not allowed"):
        model.add_expert(name, make_model(seed=7))


# --- memory: frozen constituents in bf16, recomputed activations ------------------------------


def loss_and_grads(model, ids, mask):
    """The training loss and every gradient it leaves, from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler, and this machine has none",
)
def test_compiled_frozen_blocks_give_the_same_loss_and_gradients(make_model):
    from torch._dynamo.utils import counters

    from bts.stages import compile_frozen_blocks

    model = trained(make_model, "llama-tied", gate_dropout=0.0)
    model.train_only()
    model.train()
    ids, mask = batch()

    eager = loss_and_grads(model, ids, mask)
    names = sorted(model.state_dict())
    counters.clear()
    compile_frozen_blocks(model)
    compiled = loss_and_grads(model, ids, mask)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    # blocks share graphs: far fewer than one per block of the hub and two experts
    assert counters["stats"]["unique_graphs"] < 3 * model.config.num_hidden_layers
    assert sorted(model.state_dict()) == names  # nothing renamed: checkpoints load either way
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert compiled[1].keys() == eager[1].keys() and all(n.startswith("stitches.") for n in eager[1])
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-6)


def test_recomputed_frozen_blocks_give_the_same_loss_and_gradients(make_model, monkeypatch):
    import bts.stitch as stitch_module

    model = trained(make_model, "qwen2-untied", gate_dropout=0.0)
    model.train_only()
    model.train()
    ids, mask = batch()

    kept = loss_and_grads(model, ids, mask)
    calls = []
    real = stitch_module.checkpoint
    monkeypatch.setattr(stitch_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_inference(checkpoint_frozen=True)
    recomputed = loss_and_grads(model, ids, mask)
    assert calls  # the blocks did go through torch.utils.checkpoint
    torch.testing.assert_close(recomputed[0], kept[0], rtol=0, atol=0)
    assert recomputed[1].keys() == kept[1].keys() and all(n.startswith("stitches.") for n in kept[1])
    for name, grad in kept[1].items():
        torch.testing.assert_close(recomputed[1][name], grad, rtol=1e-6, atol=1e-7)


def test_bf16_constituents_on_cpu_run_the_loop_without_a_cache(make_model, monkeypatch):
    models = [make_model("llama-tied", seed=s).to(torch.bfloat16) for s in range(3)]
    model = StitchedModel.from_models(models[0], {"a": models[1], "b": models[2]}).eval()
    assert model.batched_reason is None  # stackable: a cache still takes the batched path
    paths = []
    looped, batched = StitchedModel._run_looped, type(model.executor).run
    monkeypatch.setattr(StitchedModel, "_run_looped",
                        lambda self, *a: paths.append("loop") or looped(self, *a))
    monkeypatch.setattr(type(model.executor), "run",
                        lambda self, *a: paths.append("batched") or batched(self, *a))
    ids, _ = batch()
    with torch.no_grad():
        model(ids)
        model(ids, past_key_values=model.new_cache(), use_cache=True)
    assert paths == ["loop", "batched"]


def test_bf16_constituents_keep_fp32_stitches_and_the_hub_at_init(make_model, tmp_path):
    models = {n: make_model("llama-tied", seed=s).to(torch.bfloat16)
              for s, n in enumerate(["hub", "a", "b"])}
    for name, m in models.items():
        m.save_pretrained(tmp_path / name)
    load = type(models["hub"]).from_pretrained
    hub = load(tmp_path / "hub", dtype=torch.bfloat16)
    experts = {n: load(tmp_path / n, dtype=torch.bfloat16) for n in ("a", "b")}
    model = StitchedModel.from_models(hub, experts, num_stitches=2, gate_dropout=0.0)
    assert all(p.dtype == torch.float32 for p in model.stitch_parameters())
    ids, mask = batch()
    model.set_inference(batched=False)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():  # a = 0: exactly the bf16 hub
        assert torch.equal(model.eval()(ids).logits, hub(ids).logits)
        ours = model(ids, attention_mask=mask).logits
        theirs = hub(ids, attention_mask=mask, position_ids=positions).logits
        assert torch.equal(ours[mask.bool()], theirs[mask.bool()])
    model.train_only()
    model.train()(ids, attention_mask=mask, labels=ids).loss.backward()
    grads = [p.grad for p in model.stitch_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    randomise_stitches(model)
    model.save_pretrained(tmp_path / "stitched")
    loaded = StitchedModel.from_pretrained(tmp_path / "stitched").eval()
    assert next(loaded.hub.parameters()).dtype == torch.bfloat16
    loaded.set_inference(batched=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model.eval()(ids, attention_mask=mask).logits)
