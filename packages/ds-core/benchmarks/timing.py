"""Timing helpers shared by the ds-core benchmark scripts (one method for every number we report).

GPU: the op is warmed up on a side stream, captured in a CUDA graph (so host launch cost is out
of both the sparse and the dense side alike), a 256 MB buffer is written before every replay to
flush the 50 MB L2 of an H100, each replay sits between two CUDA events, and the median with the
quartiles is returned. ``graph=False`` times plain calls the same way (prefill: milliseconds
dwarf launch cost). CPU: two ops called alternately on the same input, so the drift of a shared
machine hits both alike.

The scripts next to this file import it as ``timing`` (they run as ``python benchmarks/x.py``,
so this directory is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch

FLUSH_BYTES = 256 << 20  # > 5x the H100's 50 MB L2
_flush: dict[torch.device, torch.Tensor] = {}


def _quantiles(us: list[float]) -> dict:
    us = sorted(us)
    return {
        "median_us": statistics.median(us),
        "p25_us": us[len(us) // 4],
        "p75_us": us[3 * len(us) // 4],
        "reps": len(us),
    }


def time_gpu(fn: Callable[[], object], reps: int, *, warmup: int = 5, graph: bool = True) -> dict:
    """Median / quartiles (microseconds) of ``fn`` on the current CUDA device, L2 flushed before each."""
    device = torch.device("cuda", torch.cuda.current_device())
    if device not in _flush:
        _flush[device] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)
    flush = _flush[device]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, autotunes, allocates outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(warmup + reps):
        flush.zero_()
        if i >= warmup:
            starts[i - warmup].record()
        run()
        if i >= warmup:
            ends[i - warmup].record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])


def time_cpu_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int) -> tuple[dict, dict]:
    """Median / quartiles (microseconds) of fn_a and fn_b called alternately, after two warm-up rounds."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(reps + 2):
        for fn, ts in zip((fn_a, fn_b), times):
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                ts.append((time.perf_counter() - t0) * 1e6)
    return _quantiles(times[0]), _quantiles(times[1])


def time_cpu(fn: Callable[[], object], reps: int) -> dict:
    """Median / quartiles (microseconds) of fn on the host clock, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return _quantiles(times)


def copy_bandwidth_GBs(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, bytes read + written per second, in GB/s (timed as above)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_gpu(lambda: dst.copy_(src), 20)["median_us"]
    return 2 * n_bytes / t / 1e3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def save_json(path: str, results: dict) -> None:
    """Write results atomically (temp file in the same directory, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
