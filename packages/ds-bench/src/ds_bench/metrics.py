"""The 18 metrics: pure functions over per-request records and run counters.

Every number ds-bench reports comes from one function here, registered in `METRICS` with its name,
unit and a one-line definition (the table in docs/packages/ds-bench.md is generated from the same
registry). The inputs are plain data:

  Request   one query: when it arrived, when each output token became available, when it completed.
  Counters  what is measured once per run: energy, memory peaks, load time, accuracy tallies, the
            work done in prefill and decode phases, and the device's peak FLOP/s and bandwidth.

A metric that cannot be computed from what was measured returns `Unavailable(reason)`, never a
guess: no energy counter on this machine, no latency targets given, a single-token generation for
TPOT, and so on. Times are in seconds inside; the registry's units say how values are reported.

Percentiles use LoadGen's rule (the value at index floor(p * n) of the sorted values, capped at
n - 1), so a p99 here and in an MLPerf summary are the same statistic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Unavailable:
    """A metric that was not measured, and why (reported as such; never estimated)."""

    reason: str


@dataclass
class Request:
    """One query's timeline, in seconds on one monotonic clock.

    arrival      when the query was issued to the system under test
    token_times  when each output token became available to the caller ([0] is the first token);
                 empty for a query that produces no tokens (a scoring-only request)
    completion   when the response was complete
    """

    arrival: float
    token_times: list[float]
    completion: float
    prompt_tokens: int = 0

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def latency(self) -> float:
        return self.completion - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if not self.token_times else self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        """(completion - first token) / (tokens - 1); None with fewer than two tokens."""
        if self.tokens < 2:
            return None
        return (self.completion - self.token_times[0]) / (self.tokens - 1)


@dataclass
class LatencyTargets:
    """Service-level targets for goodput (seconds); None = no constraint on that quantity."""

    latency: float | None = None
    ttft: float | None = None
    tpot: float | None = None

    def met_by(self, r: Request) -> bool:
        if self.latency is not None and r.latency > self.latency:
            return False
        if self.ttft is not None and (r.ttft is None or r.ttft > self.ttft):
            return False
        return not (self.tpot is not None and r.tpot is not None and r.tpot > self.tpot)

    def is_empty(self) -> bool:
        return self.latency is None and self.ttft is None and self.tpot is None


Energy = Union[float, Unavailable]


@dataclass
class Counters:
    """Whole-run measurements. Fields left at None make the metrics that need them Unavailable."""

    # accuracy: next-token predictions scored against the data, and the reference run's accuracy
    correct: int | None = None
    predicted: int | None = None
    reference_accuracy: float | None = None
    # perplexity: summed negative log-likelihood (nats) over that many scored tokens
    nll_sum: float | None = None
    nll_tokens: int | None = None
    # energy over `energy_window` seconds (the measured run), or why it could not be read
    energy_j: Energy = field(default_factory=lambda: Unavailable("energy was not measured"))
    energy_window: float | None = None
    # memory peaks in bytes during the run (device None: no accelerator in use)
    peak_host_bytes: int | None = None
    peak_device_bytes: int | None = None
    # cold start: from the start of loading the model to its first output token
    load_to_first_output: float | None = None
    # work and time per phase, and what the device can do at most
    prefill_flops: float | None = None
    prefill_seconds: float | None = None
    decode_bytes: float | None = None
    decode_seconds: float | None = None
    peak_flops: float | None = None
    peak_bytes_per_s: float | None = None
    peak_source: str = ""
    targets: LatencyTargets = field(default_factory=LatencyTargets)


Value = Union[float, dict[str, float], Unavailable]


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    definition: str
    fn: Callable[[Sequence[Request], Counters], Value]
    higher_is_better: bool = True


# ---- helpers --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """LoadGen's percentile: sorted(values)[min(n - 1, floor(p * n))]."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    return s[min(len(s) - 1, math.floor(p * len(s)))]


def span(records: Sequence[Request]) -> float:
    """Wall time covered by the records: first arrival to last completion (seconds)."""
    return max(r.completion for r in records) - min(r.arrival for r in records)


def inter_token_latencies(records: Sequence[Request]) -> list[float]:
    """Gaps between consecutive output tokens of each request, pooled over all requests."""
    return [b - a for r in records for a, b in zip(r.token_times, r.token_times[1:])]


_NO_REQUESTS = Unavailable("no requests were recorded")


def _ms(seconds: float) -> float:
    return seconds * 1e3


# ---- the metrics, in the order of the docs table ---------------------------------------------------


def accuracy(records: Sequence[Request], c: Counters) -> Value:
    if not c.predicted:
        return Unavailable("no predictions were scored (accuracy pass skipped)")
    assert c.correct is not None
    return 100.0 * c.correct / c.predicted


def accuracy_delta(records: Sequence[Request], c: Counters) -> Value:
    acc = accuracy(records, c)
    if isinstance(acc, Unavailable):
        return acc
    if c.reference_accuracy is None:
        return Unavailable("no reference result given (--reference)")
    return acc - c.reference_accuracy


def perplexity(records: Sequence[Request], c: Counters) -> Value:
    if not c.nll_tokens:
        return Unavailable("no tokens were scored (accuracy pass skipped)")
    assert c.nll_sum is not None
    return math.exp(c.nll_sum / c.nll_tokens)


def _latency_percentile(p: float) -> Callable[[Sequence[Request], Counters], Value]:
    def fn(records: Sequence[Request], c: Counters) -> Value:
        if not records:
            return _NO_REQUESTS
        return _ms(percentile([r.latency for r in records], p))

    return fn


def ttft(records: Sequence[Request], c: Counters) -> Value:
    values = [r.ttft for r in records if r.ttft is not None]
    if not values:
        return Unavailable("no request produced a token")
    return _ms(sum(values) / len(values))


def tpot(records: Sequence[Request], c: Counters) -> Value:
    values = [r.tpot for r in records if r.tpot is not None]
    if not values:
        return Unavailable("no request produced two or more tokens")
    return _ms(sum(values) / len(values))


def itl_p99(records: Sequence[Request], c: Counters) -> Value:
    gaps = inter_token_latencies(records)
    if not gaps:
        return Unavailable("no request produced two or more tokens")
    return _ms(percentile(gaps, 0.99))


def samples_per_s(records: Sequence[Request], c: Counters) -> Value:
    if not records:
        return _NO_REQUESTS
    return len(records) / span(records)


def tokens_per_s(records: Sequence[Request], c: Counters) -> Value:
    if not records:
        return _NO_REQUESTS
    return sum(r.tokens for r in records) / span(records)


def goodput(records: Sequence[Request], c: Counters) -> Value:
    if not records:
        return _NO_REQUESTS
    if c.targets.is_empty():
        return Unavailable(
            "no latency targets given (--target-latency-ms / --target-ttft-ms / --target-tpot-ms)"
        )
    return sum(c.targets.met_by(r) for r in records) / span(records)


def energy_per_sample(records: Sequence[Request], c: Counters) -> Value:
    if isinstance(c.energy_j, Unavailable):
        return c.energy_j
    if not records:
        return _NO_REQUESTS
    return c.energy_j / len(records)


def samples_per_joule(records: Sequence[Request], c: Counters) -> Value:
    if isinstance(c.energy_j, Unavailable):
        return c.energy_j
    if not records:
        return _NO_REQUESTS
    if c.energy_j <= 0:
        return Unavailable("the energy counter did not advance during the run (too short for its resolution)")
    return len(records) / c.energy_j


def average_power(records: Sequence[Request], c: Counters) -> Value:
    if isinstance(c.energy_j, Unavailable):
        return c.energy_j
    if not c.energy_window:
        return Unavailable("the energy measurement window was not recorded")
    return c.energy_j / c.energy_window


def peak_memory(records: Sequence[Request], c: Counters) -> Value:
    if c.peak_host_bytes is None and c.peak_device_bytes is None:
        return Unavailable("memory was not measured")
    out = {}
    if c.peak_host_bytes is not None:
        out["host"] = c.peak_host_bytes / 2**20
    if c.peak_device_bytes is not None:
        out["device"] = c.peak_device_bytes / 2**20
    return out


def load_time(records: Sequence[Request], c: Counters) -> Value:
    if c.load_to_first_output is None:
        return Unavailable("the cold start was not measured")
    return c.load_to_first_output


def hardware_utilisation(records: Sequence[Request], c: Counters) -> Value:
    out = {}
    why = []
    if c.prefill_flops and c.prefill_seconds and c.peak_flops:
        out["mfu_prefill"] = 100.0 * c.prefill_flops / c.prefill_seconds / c.peak_flops
    else:
        why.append("prefill FLOPs, time or the device's peak FLOP/s unknown")
    if c.decode_bytes and c.decode_seconds and c.peak_bytes_per_s:
        out["mbu_decode"] = 100.0 * c.decode_bytes / c.decode_seconds / c.peak_bytes_per_s
    else:
        why.append("decode bytes, time or the device's peak bandwidth unknown")
    return out if out else Unavailable("; ".join(why))


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", "%", "next-token top-1 accuracy on the evaluation tokens: correct / predicted", accuracy),
        Metric("accuracy_delta", "pp", "accuracy minus the reference run's accuracy (percentage points)", accuracy_delta),
        Metric("perplexity", "", "exp(summed negative log-likelihood / scored tokens) on the evaluation tokens", perplexity, False),
        Metric("latency_p50", "ms", "50th percentile of completion - arrival over requests", _latency_percentile(0.50), False),
        Metric("latency_p90", "ms", "90th percentile of completion - arrival over requests", _latency_percentile(0.90), False),
        Metric("latency_p99", "ms", "99th percentile of completion - arrival over requests", _latency_percentile(0.99), False),
        Metric("ttft", "ms", "time to first token: mean of first token - arrival", ttft, False),
        Metric("tpot", "ms", "time per output token: mean of (completion - first token) / (tokens - 1), requests with >= 2 tokens", tpot, False),
        Metric("itl_p99", "ms", "99th percentile of the gaps between consecutive tokens of a request, pooled", itl_p99, False),
        Metric("samples_per_s", "samples/s", "requests / (last completion - first arrival)", samples_per_s),
        Metric("tokens_per_s", "tokens/s", "output tokens / (last completion - first arrival)", tokens_per_s),
        Metric("goodput", "samples/s", "requests meeting every latency target / (last completion - first arrival)", goodput),
        Metric("energy_per_sample", "J/sample", "energy counter delta over the run / requests", energy_per_sample, False),
        Metric("samples_per_joule", "samples/J", "requests / energy counter delta over the run", samples_per_joule),
        Metric("average_power", "W", "energy counter delta / measurement window", average_power, False),
        Metric("peak_memory", "MiB", "peak resident host memory and peak allocated device memory during the run", peak_memory, False),
        Metric("load_time", "s", "load time to first output: start of model loading to the first generated token", load_time, False),
        Metric("hardware_utilisation", "%", "MFU of prefill (FLOPs / time / peak FLOP/s) and bandwidth utilisation of decode (bytes / time / peak B/s)", hardware_utilisation),
    ]
}  # fmt: skip


def compute(records: Sequence[Request], counters: Counters) -> dict[str, Value]:
    """Every registered metric, in registry order."""
    return {name: m.fn(records, counters) for name, m in METRICS.items()}


def metrics_table_markdown() -> str:
    """The registry as the Markdown table of the docs."""
    lines = ["| # | metric | unit | definition |", "|---|---|---|---|"]
    for i, m in enumerate(METRICS.values(), 1):
        lines.append(f"| {i} | `{m.name}` | {m.unit or '—'} | {m.definition} |")
    return "\n".join(lines)
