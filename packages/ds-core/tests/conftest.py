"""Shared fixtures of the ds-core tests.

The Triton kernels run in Triton's CPU interpreter here, so the CPU suite checks them against
the PyTorch reference. The variable must be set before anything imports triton: ds_core imports
its kernels lazily, and this conftest runs before any test module. On a machine with a CUDA GPU
the compiled kernels run instead (an explicit ``TRITON_INTERPRET`` in the environment wins).
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch does not import triton

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import importlib.util

import pytest
import torch

import ds_core

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True)
def _clean_backend_override(monkeypatch):
    """No test leaks a set_backend() override or a DS_CORE_BACKEND into the next."""
    monkeypatch.delenv("DS_CORE_BACKEND", raising=False)
    ds_core.reset_backend()
    yield
    ds_core.reset_backend()


@pytest.fixture
def needs_triton():
    """Skip unless the Triton kernels can run here (installed, and a GPU or the interpreter)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton kernels need a CUDA device or TRITON_INTERPRET=1")


@pytest.fixture
def make_mlp():
    """Factory: a SparseMLP with seeded random weights, in eval mode, of the given dtype."""

    def make(d_model=32, d_ff=96, ratio=0.5, mode="dynamic", bias=False, dtype=torch.float32, seed=0, **kw):
        torch.manual_seed(seed)
        cfg = ds_core.SparsityConfig(sparse_ratio=ratio, mode=mode, **kw)
        return ds_core.SparseMLP(d_model, d_ff, cfg, bias=bias).to(dtype).eval()

    return make


@pytest.fixture
def rel_err():
    """||a - b|| / ||b|| in float64."""

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    return err


@pytest.fixture
def tuning():
    """The decode kernels' knobs (``DECODE_TUNING``) for one test: the shared dict is mutated,
    then restored."""
    from ds_core.kernels.triton_common import DECODE_TUNING

    saved = dict(DECODE_TUNING)
    yield DECODE_TUNING
    DECODE_TUNING.clear()
    DECODE_TUNING.update(saved)
