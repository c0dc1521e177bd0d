"""Sparse kernels: dynamic sparse MLP and adaptive sparse attention (Triton on GPU, PyTorch reference on CPU)."""

from ds_core.__about__ import __version__
from ds_core.backends import reset_backend, set_backend
from ds_core.config import DsCoreError, SparsityConfig, SparsityConfigError
from ds_core.kernels.reference import static_keep_count
from ds_core.sparse_attention import SparseAttention, dense_decode_attention, sparse_attention
from ds_core.sparse_linear import DynamicSparseLinear, sparse_linear
from ds_core.sparse_mlp import SparseMLP, calibration

__all__ = [
    "DsCoreError",
    "DynamicSparseLinear",
    "SparseAttention",
    "SparseMLP",
    "SparsityConfig",
    "SparsityConfigError",
    "__version__",
    "calibration",
    "dense_decode_attention",
    "reset_backend",
    "set_backend",
    "sparse_attention",
    "sparse_linear",
    "static_keep_count",
]
