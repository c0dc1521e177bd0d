"""Helpers shared by the Triton attention kernels (``triton_attention``, ``triton_prefill``)."""

from __future__ import annotations

import torch


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep the CPU tests fast


def precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 dots (tf32 would cost ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else "tf32"
