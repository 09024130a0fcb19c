"""Byte-level BPE tokenizers trained on our domains, saved in the transformers format."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bts.errors import BtsError

EOS = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # every byte plus the special token


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) on `texts` and save it to `out_dir`.

    `<|endoftext|>` is the only special token and serves as bos, eos, pad and unk (byte-level
    BPE never needs unk). Training is deterministic given the texts and their order.
    """
    if vocab_size < MIN_VOCAB:
        raise BtsError(f"vocab_size {vocab_size} is too small: use at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved by `train_tokenizer` or any transformers tokenizer directory."""
    path = Path(path)
    if not path.is_dir():
        raise BtsError(f"tokenizer directory '{path}' does not exist: train or copy one there")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BtsError(f"cannot load a tokenizer from '{path}': {e}") from e


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would encode any text differently."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: class and vocabulary are the best identity available
        h.update(type(tokenizer).__name__.encode())
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token_id, len(tokenizer))).encode())
    return h.hexdigest()
