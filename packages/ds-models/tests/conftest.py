"""Shared fixtures: tiny ds models, tiny HF reference checkpoints and a tiny tokenizer, all built here."""

from __future__ import annotations

import pytest
import torch

from ds_models import ModelConfig, Transformer


def _spread(model: Transformer, std: float = 0.3) -> Transformer:
    # Registry init (std 0.02) makes a tied tiny model echo its input under greedy decoding;
    # wider weights give varied tokens, so token-level tests can tell paths apart.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model


@pytest.fixture
def make_model():
    """make_model(seed=0, **config overrides) -> an eval-mode ds-tiny with varied weights."""

    def make(seed: int = 0, **overrides) -> Transformer:
        torch.manual_seed(seed)
        return _spread(Transformer(ModelConfig.from_name("ds-tiny", **overrides))).eval()

    return make


@pytest.fixture
def tiny_model(make_model) -> Transformer:
    return make_model()


@pytest.fixture
def make_hf_checkpoint(tmp_path):
    """make_hf_checkpoint(kind, tied=False, shard=False, **config) -> (HF model, its directory)."""
    transformers = pytest.importorskip("transformers")

    def make(kind: str, tied: bool = False, shard: bool = False, **overrides):
        torch.manual_seed(1)
        common = dict(
            vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=tied,
        )  # fmt: skip
        common.update(overrides)
        if kind == "llama":
            config = transformers.LlamaConfig(rope_theta=500000.0, **common)
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.Qwen2Config(rope_theta=1000000.0, **common)
            model = transformers.Qwen2ForCausalLM(config)
            with torch.no_grad():  # HF inits biases to zero; make them matter for the parity check
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0.0, 0.5)
        model.eval()
        out = tmp_path / f"hf-{kind}-{'tied' if tied else 'untied'}{'-sharded' if shard else ''}"
        model.save_pretrained(out, max_shard_size="60KB" if shard else "5GB")
        return model, out

    return make


@pytest.fixture
def tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) with <|endoftext|>, trained here in milliseconds."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["the quick brown fox jumps over the lazy dog", "sparse models read fewer weights per token"] * 20
    tok.train_from_iterator(text, trainer)
    return tok
