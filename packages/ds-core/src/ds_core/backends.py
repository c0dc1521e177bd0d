"""The one dispatch point: which implementation of a kernel runs for a given tensor.

``"torch"`` is plain PyTorch (the reference semantics, plus the CPU fast paths), ``"triton"``
is the GPU kernels, ``"auto"`` picks Triton for CUDA tensors when Triton is installed and torch
otherwise. Tests force a backend for a whole block::

    with ds_core.set_backend("torch"):
        model(x)

or for a whole process with the environment variable ``DS_CORE_BACKEND=torch``. A backend named
explicitly in a call (``backend="triton"``) wins over both; ``"auto"`` in a call defers to them.
With ``TRITON_INTERPRET=1`` the Triton kernels also run on CPU tensors (slowly), which is how
the CPU test suite checks them against the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from contextlib import AbstractContextManager
from typing import Any

import torch

from ds_core.config import DsCoreError

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "DS_CORE_BACKEND"

_forced: list[str] = []  # stack of set_backend() overrides; the last one wins


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise DsCoreError(f"{where}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


class set_backend(AbstractContextManager):
    """Force the backend that ``"auto"`` resolves to.

    As a context manager the override ends with the block; called plainly it stays until
    ``reset_backend()``.
    """

    def __init__(self, name: str) -> None:
        _forced.append(_check_name(name, "set_backend(name)"))
        self._depth = len(_forced)

    def __exit__(self, *exc: Any) -> None:
        del _forced[self._depth - 1 :]


def reset_backend() -> None:
    """Drop every override made with ``set_backend``."""
    _forced.clear()


def forced_backend() -> str:
    """The override in force: the innermost ``set_backend``, else ``$DS_CORE_BACKEND``, else ``"auto"``."""
    if _forced:
        return _forced[-1]
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Can the Triton kernels run on tensors of this device?"""
    device = torch.device(device)
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreted()


def resolve(backend: str, device: torch.device | str) -> str:
    """Turn a requested backend into the one that runs: ``"torch"`` or ``"triton"``.

    A forced ``"triton"`` that cannot run here is an error, never a silent fallback, so a test
    that forces it really tests the kernel.
    """
    requested = _check_name(backend, "backend")
    if requested == "auto":
        requested = forced_backend()
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda" and triton_installed():
            return "triton"
        return "torch"
    if requested == "triton" and not triton_available(device):
        why = "triton is not installed" if not triton_installed() else f"tensors are on {device.type}"
        raise DsCoreError(
            f"backend: 'triton' cannot run here ({why}); use a CUDA device, set TRITON_INTERPRET=1 "
            "for CPU tensors, or choose backend='torch'"
        )
    return requested
