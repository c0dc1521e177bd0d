"""Sparse kernels: dynamic sparse MLP and adaptive sparse attention (Triton on GPU, PyTorch reference on CPU)."""

from ds_core.__about__ import __version__

__all__ = ["__version__"]
