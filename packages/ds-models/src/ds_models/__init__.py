"""The ds model family: config, decoder, safetensors checkpoints, Hugging Face import and fast generation."""

from ds_models.__about__ import __version__

__all__ = ["__version__"]
