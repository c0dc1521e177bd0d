"""Shared fixtures: tiny ds model directories (random weights, built here), a tokenizer, an ONNX export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ds_models import ModelConfig, Transformer

# One intra-op thread: on a shared 2-core CI machine, two OpenMP threads wait on each other whenever
# another process holds a core, and a millisecond forward of ds-tiny turns into hundreds of ms.
torch.set_num_threads(1)

TEXTS = [
    "the cat sat on the mat and the dog sat on the log.",
    "a quick brown fox jumps over the lazy dog near the river bank.",
    "sparse models skip most of their neurons for every token they read.",
    "benchmarks measure latency, throughput and energy of a model on a machine.",
] * 8


def _spread(model: Transformer, std: float = 0.3) -> Transformer:
    # Registry init (std 0.02) makes a tied tiny model echo its input under greedy decoding; wider
    # weights give varied tokens, so token-level parity tests can tell implementations apart.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """ds-tiny with random registry-init weights, as a model directory."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models") / "ds-tiny"
    Transformer(ModelConfig.from_name("ds-tiny")).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def varied_dir(tmp_path_factory) -> Path:
    """ds-tiny, untied, with wide random weights (varied greedy tokens) and a tokenizer."""
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("models") / "ds-tiny-varied"
    model = _spread(Transformer(ModelConfig.from_name("ds-tiny", tie_embeddings=False)))
    model.save_pretrained(d, tokenizer=make_tokenizer())
    return d


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory, varied_dir) -> Path:
    if importlib.util.find_spec("ds_quant") is None:
        pytest.skip("ds-quant is not installed")
    from ds_quant.onnx_export import export_directory

    return export_directory(varied_dir, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "eval.txt"
    p.write_text(" ".join(TEXTS), encoding="utf-8")
    return p
