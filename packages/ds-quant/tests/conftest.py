"""Shared fixtures: a ds-tiny model directory with a tokenizer, built here (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from ds_models import ModelConfig, Transformer

# Text for the tokenizer and for calibration / evaluation: CPython's documentation topics, which
# ship with the interpreter (no download).
try:
    from pydoc_data.topics import topics as _TOPICS
except ImportError:  # pragma: no cover - some distributions split pydoc_data out
    _TOPICS = {"x": "The quick brown fox jumps over the lazy dog. " * 400}


def corpus_text() -> str:
    return "\n\n".join(_TOPICS[k] for k in sorted(_TOPICS))[:60_000]


def make_tokenizer(path, vocab_size: int = 500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([corpus_text()], trainer)
    tok.save(str(path))
    return tok


def tiny_model(seed: int = 0, scale: float = 8.0, **overrides) -> Transformer:
    """ds-tiny with weights scaled up from the N(0, 0.02) init, so its greedy continuations vary
    (at the init scale every prompt continues with one repeated token, which tests nothing)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("ds-tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


@pytest.fixture(scope="session")
def make_tiny():
    """The `tiny_model` factory: make_tiny(seed=0, scale=8.0, **ModelConfig overrides)."""
    return tiny_model


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A float ds-tiny model directory with tokenizer.json."""
    root = tmp_path_factory.mktemp("models")
    make_tokenizer(root / "tokenizer.json")
    model = tiny_model()
    model.save_pretrained(root / "tiny", tokenizer=root / "tokenizer.json")
    return root / "tiny"
