"""Sparse kernels: dynamic sparse MLP and adaptive sparse attention (Triton on GPU, PyTorch reference on CPU)."""

from ds_core.__about__ import __version__
from ds_core.backends import reset_backend, set_backend
from ds_core.config import DsCoreError, SparsityConfig, SparsityConfigError
from ds_core.kernels.reference import static_keep_count
from ds_core.sparse_attention import SparseAttention, sparse_attention
from ds_core.sparse_mlp import SparseMLP, calibration

__all__ = [
    "DsCoreError",
    "SparseAttention",
    "SparseMLP",
    "SparsityConfig",
    "SparsityConfigError",
    "__version__",
    "calibration",
    "reset_backend",
    "set_backend",
    "sparse_attention",
    "static_keep_count",
]
