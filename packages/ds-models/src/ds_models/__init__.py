"""The ds model family: config, decoder, safetensors checkpoints, Hugging Face import and fast generation."""

from ds_models.__about__ import __version__
from ds_models.checkpoint import load_tokenizer, write_provenance
from ds_models.config import REGISTRY, ModelConfig, ModelError
from ds_models.generate import generate, sample
from ds_models.model import KVCache, Transformer, apply_rope, rope_cos_sin

__all__ = [
    "REGISTRY",
    "KVCache",
    "ModelConfig",
    "ModelError",
    "Transformer",
    "__version__",
    "apply_rope",
    "generate",
    "load_tokenizer",
    "rope_cos_sin",
    "sample",
    "write_provenance",
]
