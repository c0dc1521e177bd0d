"""Labelled-record schema, validation, datasets loading, tokenizer training, packing and Label Studio round trip."""

from ds_data.__about__ import __version__

__all__ = ["__version__"]
