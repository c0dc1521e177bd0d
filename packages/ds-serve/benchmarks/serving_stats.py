"""Serving-benchmark statistics: per-request TTFT / TPOT / e2e, their summaries, SLOs, the sweep plan.

The definitions follow vLLM's serving benchmark (`vllm bench serve`, vllm/benchmarks/serve.py,
`calculate_metrics`), all measured on the client from a streamed (SSE) response:

  TTFT  first chunk that carries a choice, minus the time the request was sent
  e2e   the last chunk that carries a choice (the one with finish_reason), minus the time sent
  TPOT  (e2e - TTFT) / (output tokens - 1); requests of one token have no TPOT
  ITL   the gaps between consecutive chunks

plus the vLLM paper's normalized latency (e2e / output tokens) and a diagnostic that vLLM does not
have, decode TPOT: (last chunk with text - first chunk) / (output tokens - 1), i.e. the TPOT a user
sees while text is arriving, without the wait for the stream to close. Summaries use numpy's
population std and linearly interpolated percentiles, as vLLM does.

A service-level objective (SLO) bounds 99th percentiles, as MLPerf Inference's LLM Server scenario
does (LoadGen checks p99 TTFT and p99 TPOT against per-model targets, e.g. Llama-2-70B 2 s /
200 ms in mlperf.conf). The benchmark scales its SLOs from the unloaded TTFT / TPOT of the same run
(`scaled_slo`). `max_rate_meeting` is the highest swept arrival rate at which the SLO holds at that
rate and at every lower swept rate (a system that fails at a low rate and passes again higher up
has not shown that it sustains the higher rate).

This file is imported by bench_batching.py and tested by tests/test_serve_bench_stats.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

METRICS = ("ttft", "tpot", "e2e", "norm_latency", "decode_tpot")
PERCENTILES = (50, 90, 99)


def request_metrics(sent: float, choice_times: Sequence[float], text_times: Sequence[float],
                    output_tokens: int) -> dict[str, float | None]:  # fmt: skip
    """One streamed request: times are absolute (one clock); choice_times = every chunk with a choice,
    text_times = those with non-empty text. TPOT / decode TPOT are None for a one-token output."""
    if not choice_times or output_tokens < 1:
        raise ValueError("request_metrics: a completed request has at least one chunk and one token")
    ttft = choice_times[0] - sent
    e2e = choice_times[-1] - sent
    multi = output_tokens > 1
    return {
        "ttft": ttft,
        "e2e": e2e,
        "tpot": (e2e - ttft) / (output_tokens - 1) if multi else None,
        "decode_tpot": (text_times[-1] - choice_times[0]) / (output_tokens - 1)
        if multi and text_times
        else None,
        "norm_latency": e2e / output_tokens,
        "output_tokens": output_tokens,
        "itl_max": float(max(np.diff(choice_times), default=0.0)),
    }


def summarize(values: Iterable[float | None]) -> dict[str, float] | None:
    """mean / std (population) / p50 / p90 / p99 of the values that are not None."""
    xs = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if xs.size == 0:
        return None
    out = {"mean": float(xs.mean()), "std": float(xs.std())}
    out.update({f"p{q}": float(np.percentile(xs, q)) for q in PERCENTILES})
    return out


def summarize_requests(requests: Sequence[dict]) -> dict:
    """{"n": ..., metric: summarize(...)} over request_metrics dicts."""
    return {"n": len(requests), **{m: summarize(r[m] for r in requests) for m in METRICS}}


def std_reduction(continuous: dict, fixed: dict) -> dict[str, float | None]:
    """1 - std(continuous) / std(fixed) per metric (0.7 = 70 % lower); None where undefined."""
    out = {}
    for m in METRICS:
        c, f = continuous.get(m), fixed.get(m)
        out[m] = 1 - c["std"] / f["std"] if c and f and f["std"] > 0 else None
    return out


@dataclass(frozen=True)
class Slo:
    """Bounds (seconds) on 99th percentiles; None leaves a metric free."""

    name: str
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met(self, summary: dict) -> bool:
        for metric in ("ttft", "tpot", "e2e"):
            bound = getattr(self, metric)
            if bound is not None and (summary.get(metric) is None or summary[metric]["p99"] > bound):
                return False
        return True

    def to_dict(self) -> dict:
        return asdict(self)


def scaled_slo(name: str, ttft0: float, tpot0: float, *, ttft_x: float | None = None,
               tpot_x: float | None = None, e2e0: float | None = None, e2e_x: float | None = None) -> Slo:  # fmt: skip
    """An SLO as multiples of unloaded values: p99 TTFT <= ttft_x * ttft0, and so on."""
    return Slo(
        name,
        ttft=ttft_x * ttft0 if ttft_x else None,
        tpot=tpot_x * tpot0 if tpot_x else None,
        e2e=e2e_x * e2e0 if e2e_x and e2e0 else None,
    )


def max_rate_meeting(points: Sequence[tuple[float, dict]], slo: Slo) -> tuple[float, float | None]:
    """(highest rate that meets `slo` with every lower swept rate, lowest swept rate that fails it).

    points: (arrival rate, summarize_requests(...)). (0.0, lowest rate) when the lowest rate fails
    already; (highest rate, None) when nothing swept fails (the sweep did not reach the limit)."""
    best = 0.0
    for rate, summary in sorted(points, key=lambda p: p[0]):
        if not slo.met(summary):
            return best, rate
        best = rate
    return best, None


def queries_per_point(budget_s: float, rates: Sequence[float], capacity: Sequence[float], *,
                      lo: int = 100, hi: int = 1000) -> int:  # fmt: skip
    """How many queries each (rate, mode) point can have so the sweep takes about `budget_s`.

    A point of n Poisson queries at `rate` lasts about n / min(rate, capacity): past a mode's
    capacity (its closed-loop request rate) the queue grows and the point lasts as long as the
    server takes to answer n requests. Clamped to [lo, hi]."""
    per_query = sum(1 / min(r, c) for r in rates for c in capacity)
    return int(min(hi, max(lo, budget_s / per_query)))
