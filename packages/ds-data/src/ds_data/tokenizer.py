"""Byte-level BPE tokenizer training with HF ``tokenizers``; the result is a ``tokenizer.json`` that a
ds-models model directory loads as is."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ds_data.atomic import write_atomic
from ds_data.errors import DsDataError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def _texts(source: Iterable[str] | datasets.Dataset | datasets.DatasetDict) -> Iterator[str]:
    if isinstance(source, datasets.DatasetDict):
        source = source["train"]
    if isinstance(source, datasets.Dataset):
        if "text" not in source.column_names:
            raise DsDataError(f"dataset: text: no 'text' column (columns: {source.column_names})")
        for batch in source.iter(batch_size=1000):
            yield from batch["text"]
        return
    if isinstance(source, str):
        raise DsDataError("texts_or_dataset: expected an iterable of strings or a Dataset, got one str")
    for i, text in enumerate(source):
        if not isinstance(text, str):
            raise DsDataError(f"texts_or_dataset[{i}]: expected str, got {type(text).__name__}")
        yield text


def tokenizer_path(out_path: str) -> str:
    """``out_path`` may be a file (``.json``) or a directory, which then gets ``tokenizer.json``."""
    if out_path.endswith(".json"):
        return out_path
    return os.path.join(out_path, "tokenizer.json")


def train_tokenizer(
    texts_or_dataset: Iterable[str] | datasets.Dataset | datasets.DatasetDict,
    vocab_size: int,
    out_path: str | None,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer; ``<|endoftext|>`` (EOS) and ``<|pad|>`` are special tokens.

    Writes ``tokenizer.json`` atomically to ``out_path`` (a ``.json`` file or a directory) unless None.
    """
    # 256 byte symbols plus the special tokens is the smallest vocabulary a byte-level BPE can have.
    floor = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise DsDataError(f"vocab_size: expected an integer >= {floor}, got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_texts(texts_or_dataset), trainer=trainer)
    if out_path is not None:
        write_atomic(tokenizer_path(out_path), tok.to_str(pretty=True))
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a directory holding one)."""
    path = path if os.path.isfile(path) else tokenizer_path(path)
    if not os.path.isfile(path):
        raise DsDataError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DsDataError(f"{path}: not a tokenizers JSON file: {exc}") from None
