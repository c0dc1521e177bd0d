"""Timing helpers of the ds-models decode benchmarks (bench_decode.py, decode_studies.py)."""

from __future__ import annotations

import statistics
import time

import torch

from ds_models import generate


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, prompts, n, mode):
    sync()
    t0 = time.perf_counter()
    out = generate(model, prompts, n, mode=mode)  # returns lists: the device is synced
    return time.perf_counter() - t0, out


def measure(model, batch, prompt_len, new_tokens, mode, repeats):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    t_warm = time.perf_counter()
    generate(model, prompts, new_tokens, mode=mode)  # compile / capture
    warmup_s = time.perf_counter() - t_warm
    full, first = [], []
    out = None
    for _ in range(repeats):
        t, out = timed_generate(model, prompts, new_tokens, mode)
        full.append(t)
        first.append(timed_generate(model, prompts, 1, mode)[0])
    t_full, t_first = statistics.median(full), statistics.median(first)
    return dict(
        batch=batch,
        mode=mode,
        new_tokens=new_tokens,
        decode_tok_s=batch * (new_tokens - 1) / (t_full - t_first),
        e2e_tok_s=batch * new_tokens / t_full,
        ms_per_step=1000 * (t_full - t_first) / (new_tokens - 1),
        warmup_s=warmup_s,
        tokens=out[0][:16],
    )


def graph_ms(fn, reps=10):
    """ms per replay of fn captured in a CUDA graph (one warm-up on a side stream, no L2 flush)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
