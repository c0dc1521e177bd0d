"""The machine a result was measured on: its name, its peak FLOP/s and bandwidth, memory peaks.

Peaks for utilisation come from the vendor's datasheet for known GPUs (dense, no sparsity), and are
measured on the spot for a CPU (a large matmul in the run's dtype and a large tensor copy), because
CPU peaks depend on cores, clocks and memory channels no table knows. `peak_source` says which.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass

# name substring -> (peak dense FLOP/s by dtype, bytes/s). Datasheet numbers, SXM parts unless named.
GPU_PEAKS: list[tuple[str, dict[str, float], float]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494.5e12}, 4.8e12),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12, "tf32": 378e12}, 2.0e12),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12, "tf32": 417.5e12}, 3.9e12),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494.5e12}, 3.35e12),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12}, 2.039e12),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12, "tf32": 60e12}, 0.3e12),
]


@dataclass
class Peaks:
    flops: float | None
    bytes_per_s: float | None
    source: str


def describe_device(device: str) -> dict:
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "count": torch.cuda.device_count(),
        }
    return {"type": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_peaks(device: str, dtype: str) -> Peaks:
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device).index or 0)
        for key, flops, bw in GPU_PEAKS:
            if key in name:
                kind = "tf32" if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32 else dtype
                return Peaks(flops.get(kind), bw, f"datasheet ({key}, {kind} dense)")
        return Peaks(None, None, f"no datasheet peaks for {name!r}")
    return measure_cpu_peaks(dtype)


_best_flops: dict[str, float] = {}  # per dtype
_best_bandwidth = [0.0]  # one memory system, whatever the dtype


def measure_cpu_peaks(dtype: str, seconds: float = 0.5, sizes: tuple[int, ...] = (1024, 2048)) -> Peaks:
    """Best matmul FLOP/s in `dtype` (1024^2 and 2048^2) and best copy bandwidth, on all threads torch
    uses, each repeated for `seconds` / 2 and at least 3 times. Kept as a running best for the process
    (bandwidth across dtypes: it does not depend on them): on a shared machine a later, quieter
    measurement can only raise the peak, so runs in one process are judged against the same number."""
    import torch

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    flops = _best_flops.get(dtype, 0.0)
    for n in sizes:
        a, b = torch.randn(n, n, dtype=tdtype), torch.randn(n, n, dtype=tdtype)
        end, runs = time.perf_counter() + seconds / 4, 0
        while runs < 3 or time.perf_counter() < end:
            t = time.perf_counter()
            torch.mm(a, b)
            flops = max(flops, 2 * n**3 / (time.perf_counter() - t))
            runs += 1
    src = torch.empty(64 * 2**20 // 4, dtype=torch.float32).fill_(1.0)  # 64 MiB, well past the LLC
    dst = torch.empty_like(src)
    bw = _best_bandwidth[0]
    end, runs = time.perf_counter() + seconds / 2, 0
    while runs < 3 or time.perf_counter() < end:
        t = time.perf_counter()
        dst.copy_(src)
        bw = max(bw, 2 * src.numel() * 4 / (time.perf_counter() - t))  # read + write
        runs += 1
    _best_flops[dtype], _best_bandwidth[0] = flops, bw
    sizes_text = "/".join(f"{n}^2" for n in sizes)
    return Peaks(flops, bw, f"measured on this CPU: best torch.mm {sizes_text} {dtype}, 64 MiB tensor copy")


# ---- memory peaks ---------------------------------------------------------------------------------


def reset_host_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_bytes() -> int:
    """Peak resident memory of this process since the last reset (VmHWM), else since it started."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024


def reset_device_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))
