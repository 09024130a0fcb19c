"""Stitch-layer options: the `paper` preset is Eq. 3-4 as written, and every option survives
save/load and export."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bts.config import parse_config
from bts.stitch import (
    EXPERTS_INTO_HUB,
    HUB_INTO_EXPERTS,
    PAPER_SPEC,
    StitchedModel,
    StitchLayer,
    StitchSpec,
    random_initialisation,
)

WIDTH = 8


def paper_layer(kind: str, names: list[str]) -> StitchLayer:
    torch.manual_seed(0)
    options = StitchSpec(**{**PAPER_SPEC.__dict__, "gate_dropout": 0.0})
    layer = StitchLayer(kind, WIDTH, names, spec=options)
    with torch.no_grad():  # the paper's layer: nn.Linear init and a = 1
        for linear in [*layer.proj.values(), *layer.gate.values()]:
            linear.reset_parameters()
        for scale in layer.scale.values():
            scale.fill_(1.0)
    return layer.eval()


def test_paper_experts_into_hub_is_eq3_with_projected_expert_streams():
    names = ["a", "b"]
    layer = paper_layer(EXPERTS_INTO_HUB, names)
    assert all(layer.gate[s].bias is None for s in ["hub", *names])
    gen = torch.Generator().manual_seed(1)
    h0 = 3.0 * torch.randn(2, 5, WIDTH, generator=gen)  # raw scale matters: no norm in Eq. 3
    h = {n: torch.randn(2, 5, WIDTH, generator=gen) for n in names}
    hub, experts, _ = layer(h0, h)
    # Eq. 3 by hand: per-dimension softmax over sources of W_gate_i(h_0), P_0 = I
    logits = torch.stack([h0 @ layer.gate[s].weight.T for s in ["hub", *names]])
    g = torch.softmax(logits, dim=0)
    projected = {n: h[n] @ layer.proj[n].weight.T for n in names}
    expected = g[0] * h0 + sum(g[i + 1] * projected[n] for i, n in enumerate(names))
    torch.testing.assert_close(hub, expected, rtol=1e-5, atol=1e-6)
    for n in names:  # the corrected note: expert i's next block reads W_proj_i(h_i)
        torch.testing.assert_close(experts[n], projected[n], rtol=1e-5, atol=1e-6)


def test_paper_hub_into_experts_is_eq4():
    names = ["a", "b"]
    layer = paper_layer(HUB_INTO_EXPERTS, names)
    gen = torch.Generator().manual_seed(2)
    h0 = 3.0 * torch.randn(2, 5, WIDTH, generator=gen)
    h = {n: torch.randn(2, 5, WIDTH, generator=gen) for n in names}
    hub, experts, _ = layer(h0, h)
    assert torch.equal(hub, h0)
    for n in names:
        s = torch.sigmoid(h0 @ layer.gate[n].weight.T)
        expected = (1 - s) * h[n] + s * (h0 @ layer.proj[n].weight.T)
        torch.testing.assert_close(experts[n], expected, rtol=1e-5, atol=1e-6)


def test_our_layer_keeps_expert_streams_and_reads_the_normalised_hub():
    layer = StitchLayer(EXPERTS_INTO_HUB, WIDTH, ["a"], spec=StitchSpec(gate_dropout=0.0))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    h0, h = torch.randn(1, 3, WIDTH), {"a": torch.randn(1, 3, WIDTH)}
    _, experts, gates = layer(h0, h)
    assert experts["a"] is h["a"]
    _, _, scaled = layer(10.0 * h0, h)  # RMS norm: the hub's scale does not change the gates
    torch.testing.assert_close(scaled, gates)


def test_the_paper_variant_in_the_config_resolves_to_the_paper_layer():
    stitch = parse_config({"stitch": {"variant": "paper"}}).stitch
    assert stitch.init == "random" and stitch.spec(8) == PAPER_SPEC.resolve(8)
    mixed = parse_config({"stitch": {"variant": "paper", "gate_input": "rms"}}).stitch
    assert mixed.spec(8).gate_input == "rms" and mixed.spec(8).expert_stream == "project"
    ours = parse_config({"stitch": {}}).stitch.spec(8)
    assert ours == StitchSpec(init="uniform_into_hub").resolve(8)


def test_bts_heads_has_its_own_expert_dropout_and_bts_keeps_the_stitch_sections():
    config = parse_config({"stitch": {"expert_dropout": 0.1}})
    assert config.stitch.spec(8).expert_dropout == 0.1
    assert config.heads_config().stitch.spec(8).expert_dropout == 0.3  # the shipped default
    chosen = parse_config({"bts_heads": {"expert_dropout": 0.0}}).heads_config()
    assert chosen.stitch.spec(8).expert_dropout == 0.0 and chosen.stitch.output == "mixture"
    with pytest.raises(Exception, match="expert_dropout"):
        parse_config({"bts_heads": {"expert_dropout": 1.0}})
    with pytest.raises(Exception, match="expert_dropout 1.5 is out of range"):
        StitchSpec(expert_dropout=1.5)


OPTION_SETS = [
    StitchSpec(gate_dropout=0.0, gate_input="raw"),
    StitchSpec(gate_dropout=0.0, gate_bias=False),
    StitchSpec(gate_dropout=0.0, expert_stream="project"),
    StitchSpec(**{**PAPER_SPEC.__dict__, "gate_dropout": 0.0, "gate_gain": 2.0}),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: repr(o)[13:60])
def test_every_option_round_trips_through_save_load_and_export(make_model, tmp_path, options):
    from transformers import AutoModelForCausalLM

    import bts  # noqa: F401  (registers the export's model type)
    from bts.data.tokenizer import train_tokenizer
    from bts.export import export

    tokenizer = train_tokenizer(
        ["def f(x):\n    return x + 1\n", "Some words."] * 8, 300, tmp_path / "tok"
    )
    vocab = len(tokenizer)
    hub, a, b = (make_model("llama-tied", seed=s, vocab_size=vocab) for s in range(3))
    for name, m in {"hub": hub, "a": a, "b": b}.items():
        m.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "hub")
    load = type(hub).from_pretrained
    experts = {"a": load(tmp_path / "a"), "b": load(tmp_path / "b")}
    model = StitchedModel.from_models(
        load(tmp_path / "hub"), experts, num_stitches=4, spec=options
    )
    random_initialisation(model, seed=3)  # away from identity, so every option matters
    model.eval()
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "stitched")
    loaded = StitchedModel.from_pretrained(tmp_path / "stitched")
    assert loaded.spec == model.spec == replace(options, placement=model.spec.placement)
    loaded.eval()
    export(tmp_path / "stitched", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.stitched.spec == model.spec
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(exported(ids).logits, expected)
    loaded.set_inference(batched=False)
    with torch.no_grad():  # the per-model loop and the batched path agree (float rounding)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_edited_or_unknown_options_in_a_manifest_are_refused(make_model, tmp_path):
    import json

    from bts.errors import BtsError

    for name, seed in (("hub", 0), ("a", 1)):
        make_model("llama-tied", seed=seed).save_pretrained(tmp_path / name)
    load = type(make_model("llama-tied")).from_pretrained
    model = StitchedModel.from_models(
        load(tmp_path / "hub"),
        {"a": load(tmp_path / "a")},
        num_stitches=2,
        spec=StitchSpec(expert_stream="project"),
    )
    model.save_pretrained(tmp_path / "s")
    path = tmp_path / "s" / "bts_stitch.json"
    saved = json.loads(path.read_text())
    assert saved["expert_stream"] == "project"
    for edit, message in (
        ({"expert_stream": "keep"}, "edited after saving"),
        ({"gate_input": "sideways"}, "field 'gate_input' is 'sideways'"),
        ({"gate_bias": 1}, "field 'gate_bias' is 1"),
    ):
        path.write_text(json.dumps({**saved, **edit}))
        with pytest.raises(BtsError, match=message):
            StitchedModel.from_pretrained(tmp_path / "s")


def test_uniform_start_is_an_even_blend_and_a_later_expert_enters_silently(make_model):
    from bts.stitch import uniform_initialisation

    hub, a, b, c = (make_model("llama-tied", seed=s) for s in range(4))
    model = StitchedModel.from_models(
        hub, {"a": a, "b": b}, num_stitches=4, spec=StitchSpec(gate_dropout=0.0)
    )
    uniform_initialisation(model)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    h0, h = (
        torch.randn(2, 3, 32, generator=gen),
        {n: torch.randn(2, 3, 32, generator=gen) for n in "ab"},
    )
    e2h = next(s for s in model.stitches.values() if s.kind == EXPERTS_INTO_HUB)
    mixed, _, gates = e2h(h0, h)
    torch.testing.assert_close(mixed, (h0 + h["a"] + h["b"]) / 3)  # MixtureKit's step 0
    assert torch.allclose(gates, torch.full_like(gates, 1 / 3))
    h2e = next(s for s in model.stitches.values() if s.kind == HUB_INTO_EXPERTS)
    _, streams, _ = h2e(h0, h)
    torch.testing.assert_close(streams["a"], (h["a"] + h0) / 2)
    ids = torch.randint(0, 101, (2, 7), generator=gen)
    with torch.no_grad():
        before = model(ids).logits
        model.add_expert("c", c)  # a new expert enters at a = 0 whatever the others' start
        assert torch.equal(model(ids).logits, before)
    assert not torch.equal(before, model.hub(ids).logits)  # the start is not the hub


def test_uniform_into_hub_opens_only_the_experts_into_hub_stitches(make_model):
    from bts.stitch import uniform_initialisation

    hub, a = make_model("llama-tied", seed=0), make_model("llama-tied", seed=1)
    model = StitchedModel.from_models(hub, {"a": a}, num_stitches=4)
    uniform_initialisation(model, kinds=[EXPERTS_INTO_HUB])
    for stitch in model.stitches.values():
        opened = stitch.kind == EXPERTS_INTO_HUB
        assert torch.equal(stitch.scale["a"], torch.full_like(stitch.scale["a"], float(opened)))
