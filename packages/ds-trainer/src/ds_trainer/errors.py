"""The one exception type of ds-trainer: bad input the user can fix.

The CLI turns it into a single line on stderr and exit code 2. The message always names the file,
the config key or the flag, and says what was expected.
"""

from __future__ import annotations


class TrainerError(ValueError):
    """Bad training input: an unknown or ill-typed config key, missing data or model, a resume
    directory written by a different config, out of memory at the configured batch size."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA out of memory, a Python MemoryError, or the CPU allocator's failure (which torch
    raises as a plain RuntimeError: "DefaultCPUAllocator: can't allocate memory")."""
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
