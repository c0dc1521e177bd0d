"""MLPerf LoadGen scenarios over a Backend: SingleStream, Server and Offline, scaled to short runs.

LoadGen (mlcommons-loadgen, the MLPerf Inference reference load generator) decides when queries are
issued and whether the run is VALID; ds-bench is the system under test (SUT). One worker thread owns
the backend and serves what LoadGen issued, in arrival order, up to `batch_size` samples per batch:

  singlestream  one query at a time, the next issued when the last completes
  server        Poisson arrivals at `target_qps`; whatever has queued up is batched (static batching)
  offline       every sample issued at once; served in batches of `batch_size`

Each generated step is stamped on the host (`Request.token_times`); LoadGen hears of the first token
(FirstTokenComplete) and of the completion, with the token count, so it computes TTFT / TPOT and
checks them itself (use_token_latencies). The verdict and statistics are read back from LoadGen's
own log (mlperf_log_detail.txt, cross-checked against the "Result is" line of mlperf_log_summary.txt).

Short runs: MLPerf's defaults are 10-minute runs at the 99th percentile. Here min_duration is
seconds and the latency percentile defaults to 90. min_query_count, unless given, is what LoadGen's
early-stopping test needs at that percentile (`early_stopping_queries`, the same binomial rule as
LoadGen's early_stopping.cc): SingleStream 64 queries (p90); Server 113 queries (p90), the count at
which a run still passes with SERVER_OVERLATENCY_ALLOWANCE = 4 queries over a latency target. With
LoadGen's bare minimum (44 queries at p90) a single over-latency query voids a Server run; the rate and
targets that runner.py derives from the calibration keep the expected share of over-latency queries
around 1 % or less, so 4 of 113 is rarely exceeded by a healthy system and an INVALID verdict means
something. These settings are written into every result.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ds_bench.backends import Backend, now
from ds_bench.errors import BenchError
from ds_bench.metrics import Request

SCENARIOS = ("singlestream", "server", "offline")
_LG_NAMES = {"singlestream": "SingleStream", "server": "Server", "offline": "Offline"}
SERVER_OVERLATENCY_ALLOWANCE = 4  # over-latency queries a default-length Server run can absorb
EARLY_STOPPING_CONFIDENCE = 0.99  # LoadGen's, hard-coded in results.cc


def _binomial_cdf(k: int, n: int, q: float) -> float:
    """P(X <= k) for X ~ Binomial(n, q), summed in log space (n in the thousands stays exact enough)."""
    lq, lp = math.log(q), math.log1p(-q)
    return sum(
        math.exp(math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * lq + (n - x) * lp)
        for x in range(k + 1)
    )


def early_stopping_min_passing(
    t: int, percentile: float, confidence: float = EARLY_STOPPING_CONFIDENCE
) -> int:
    """LoadGen's MinPassingQueriesFinder: the fewest under-latency queries h such that seeing at most t
    over-latency queries among h + t would be unlikely (probability < 1 - confidence) if the true share
    of over-latency queries were 1 - percentile. A Server run of n queries with t over-latency passes
    LoadGen's early stopping when n >= h + t."""
    h = max(1, math.ceil(math.log(1 - confidence) / math.log(percentile)))  # the t = 0 answer
    while _binomial_cdf(t, h + t, 1 - percentile) >= 1 - confidence:
        h += 1
    return h


def early_stopping_queries(scenario: str, percentile: float) -> int:
    """The default min_query_count: what LoadGen's early stopping needs in `scenario` at `percentile`."""
    if scenario == "singlestream":  # results.cc: "Need to process at least h_min + 1 queries"
        return early_stopping_min_passing(1, percentile) + 1
    if scenario == "server":
        t = SERVER_OVERLATENCY_ALLOWANCE
        return early_stopping_min_passing(t, percentile) + t
    return 1  # offline: one query holds every sample


@dataclass
class ScenarioSettings:
    """LoadGen settings for one run (seconds; converted to LoadGen's ns / ms)."""

    scenario: str
    gen_tokens: int = 16
    batch_size: int = 8
    min_duration: float = 1.0
    max_duration: float = 300.0
    min_query_count: int | None = None  # None: early_stopping_queries(scenario, latency_percentile)
    latency_percentile: float = 0.9
    # Filled from the calibration run when not given (runner.py):
    target_qps: float | None = None  # server arrival rate
    expected_qps: float | None = None  # offline: sizes the one big query
    expected_latency: float | None = None  # singlestream: a hint for LoadGen's query count
    target_latency: float | None = None  # server: per-query latency bound (when no token latencies)
    ttft_target: float | None = None  # server with token latencies
    tpot_target: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise BenchError(f"--scenario: unknown {self.scenario!r}; expected one of {', '.join(SCENARIOS)}")
        if not 0 < self.latency_percentile < 1:
            raise BenchError(
                f"--latency-percentile: expected a number in (0, 1), got {self.latency_percentile}"
            )
        if self.min_query_count is None:
            self.min_query_count = early_stopping_queries(self.scenario, self.latency_percentile)
        for name in ("gen_tokens", "batch_size", "min_query_count"):
            if getattr(self, name) < 1:
                raise BenchError(
                    f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}"
                )

    @property
    def token_latencies(self) -> bool:
        return self.gen_tokens >= 2


@dataclass
class ScenarioResult:
    records: list[Request]
    valid: bool
    loadgen: dict[str, Any]
    window: float  # seconds from StartTest to its return (the energy window)


def _loadgen():
    try:
        import mlperf_loadgen
    except ImportError:
        raise BenchError("scenarios need MLPerf LoadGen: pip install mlcommons-loadgen") from None
    return mlperf_loadgen


class _SUT:
    """The system under test: LoadGen's callbacks on one side, one backend worker on the other."""

    def __init__(self, lg, backend: Backend, prompts: list[list[int]], settings: ScenarioSettings) -> None:
        self.lg, self.backend, self.prompts, self.settings = lg, backend, prompts, settings
        self.pending: queue.Queue = queue.Queue()
        self.records: list[Request] = []
        self.error: BaseException | None = None
        self.worker = threading.Thread(target=self._work, name="ds-bench-sut", daemon=True)
        self.worker.start()

    # LoadGen's threads call these two; they must return quickly.
    def issue_query(self, samples) -> None:
        t = now()
        for s in samples:
            self.pending.put((s.id, s.index, t))

    def flush_queries(self) -> None:
        pass

    def close(self) -> None:
        self.pending.put(None)
        self.worker.join()

    def _work(self) -> None:
        while True:
            item = self.pending.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.settings.batch_size:
                try:
                    nxt = self.pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.pending.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self._serve(batch)

    def _serve(self, batch: list[tuple[int, int, float]]) -> None:
        lg = self.lg
        n = self.settings.gen_tokens
        times: list[list[float]] = [[] for _ in batch]
        tokens = np.zeros((len(batch), n), dtype=np.int32)  # the responses' data; alive until completed

        first_sent = [False]

        def send_first_tokens() -> None:
            first_sent[0] = True
            lg.FirstTokenComplete(
                [
                    lg.QuerySampleResponse(qid, tokens[j].ctypes.data, 4, 1)
                    for j, (qid, _, _) in enumerate(batch)
                ]
            )

        def on_step(step: int, toks: list[int], t: float) -> None:
            for j, tok in enumerate(toks):
                times[j].append(t)
                tokens[j, step] = tok
            if step == 0 and self.settings.token_latencies:
                send_first_tokens()

        try:
            if self.error is None:
                self.backend.generate([self.prompts[idx] for _, idx, _ in batch], n, on_step)
        except BaseException as e:  # keep LoadGen going: it would wait forever for these samples
            self.error = e
        done = now()
        if self.error is not None and self.settings.token_latencies and not first_sent[0]:
            send_first_tokens()  # LoadGen's token accounting crashes on a completion without one
        responses = []
        for j, (qid, idx, arrival) in enumerate(batch):
            # After a failure the run is void (run_scenario raises); report full-length responses so
            # LoadGen's bookkeeping stays consistent until it finishes.
            k = len(times[j]) if self.error is None else n
            responses.append(lg.QuerySampleResponse(qid, tokens[j].ctypes.data, 4 * k, k))
            if self.error is None:
                self.records.append(Request(arrival, times[j], done, prompt_tokens=len(self.prompts[idx])))
        lg.QuerySamplesComplete(responses)


def loadgen_settings(lg, s: ScenarioSettings):
    ts = lg.TestSettings()
    ts.scenario = getattr(lg.TestScenario, _LG_NAMES[s.scenario])
    ts.mode = lg.TestMode.PerformanceOnly
    ts.min_duration_ms = int(s.min_duration * 1e3)
    ts.max_duration_ms = int(s.max_duration * 1e3)
    assert s.min_query_count is not None  # resolved in __post_init__
    ts.min_query_count = s.min_query_count if s.scenario != "offline" else 1
    ts.qsl_rng_seed = ts.sample_index_rng_seed = ts.schedule_rng_seed = s.seed
    ts.use_token_latencies = s.token_latencies
    if s.scenario == "singlestream":
        ts.single_stream_expected_latency_ns = int((s.expected_latency or 0.01) * 1e9)
        ts.single_stream_target_latency_percentile = s.latency_percentile
    elif s.scenario == "server":
        if not s.target_qps:
            raise BenchError("--target-qps: the server scenario needs an arrival rate")
        ts.server_target_qps = s.target_qps
        ts.server_target_latency_percentile = s.latency_percentile
        ts.server_target_latency_ns = int((s.target_latency or 1.0) * 1e9)
        if s.token_latencies:
            ts.ttft_latency = int((s.ttft_target or 1.0) * 1e9)
            ts.tpot_latency = int((s.tpot_target or 1.0) * 1e9)
    else:
        ts.offline_expected_qps = s.expected_qps or 1.0
    return ts


def run_scenario(
    backend: Backend, prompts: list[list[int]], settings: ScenarioSettings, log_dir: str | os.PathLike[str]
) -> ScenarioResult:
    """One LoadGen performance run; the logs stay in `log_dir`."""
    lg = _loadgen()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    sut = _SUT(lg, backend, prompts, settings)
    sut_handle = lg.ConstructSUT(sut.issue_query, sut.flush_queries)
    # Samples live in memory already: nothing to load or unload per sample.
    qsl_handle = lg.ConstructQSL(len(prompts), len(prompts), lambda idx: None, lambda idx: None)
    out = lg.LogOutputSettings()
    out.outdir = str(log_dir)
    out.copy_summary_to_stdout = False
    log = lg.LogSettings()
    log.log_output = out
    log.enable_trace = False
    start = now()
    try:
        lg.StartTestWithLogSettings(sut_handle, qsl_handle, loadgen_settings(lg, settings), log)
    finally:
        window = now() - start
        sut.close()
        lg.DestroyQSL(qsl_handle)
        lg.DestroySUT(sut_handle)
    if sut.error is not None:
        raise sut.error
    parsed = parse_loadgen_logs(log_dir)
    parsed["settings"] = asdict(settings)
    return ScenarioResult(sut.records, parsed["valid"], parsed, window)


# ---- reading LoadGen's logs -----------------------------------------------------------------------

# What a result keeps from mlperf_log_detail.txt (the rest stays in the log directory).
_DETAIL_KEYS = (
    "loadgen_version", "effective_scenario", "effective_target_qps", "effective_samples_per_query",
    "effective_min_duration_ms", "effective_min_query_count", "effective_target_latency_ns",
    "effective_target_latency_percentile", "result_validity", "result_invalid_reason",
    "result_perf_constraints_met", "result_min_duration_met", "result_min_queries_met", "early_stopping_met",
    "result_query_count", "result_overlatency_query_count", "result_samples_per_second",
    "result_completed_samples_per_sec", "result_scheduled_samples_per_sec", "result_completed_tokens_per_second",
    "result_tokens_per_second", "result_mean_latency_ns", "result_50.00_percentile_latency_ns",
    "result_90.00_percentile_latency_ns", "result_99.00_percentile_latency_ns",
    "result_first_token_mean_latency_ns", "result_time_to_output_token_mean", "num_errors", "num_warnings",
    "early_stopping_result", "early_stopping_ttft_result", "early_stopping_tpot_result",
)  # fmt: skip


def parse_loadgen_logs(log_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """{"valid": bool, "result": "VALID"|"INVALID", "detail": {...}, "summary": {...}, "log_dir": ...}."""
    log_dir = Path(log_dir)
    detail_path, summary_path = log_dir / "mlperf_log_detail.txt", log_dir / "mlperf_log_summary.txt"
    try:
        detail_text = detail_path.read_text(encoding="utf-8")
        summary_text = summary_path.read_text(encoding="utf-8")
    except OSError as e:
        raise BenchError(f"{e.filename}: LoadGen log missing or unreadable") from None
    detail: dict[str, Any] = {}
    errors = []
    for lineno, line in enumerate(detail_text.splitlines(), 1):
        if not line.startswith(":::MLLOG "):
            continue
        try:
            entry = json.loads(line[len(":::MLLOG ") :])
        except json.JSONDecodeError:
            raise BenchError(f"{detail_path}: line {lineno}: not an MLLOG JSON entry") from None
        if entry.get("metadata", {}).get("is_error"):
            errors.append(str(entry.get("value")))
        if entry.get("key") in _DETAIL_KEYS:
            detail[entry["key"]] = entry["value"]
    summary = {}
    for line in summary_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and value.strip():
            summary[key.strip()] = value.strip()
    verdict = summary.get("Result is")
    if verdict not in ("VALID", "INVALID"):
        raise BenchError(f"{summary_path}: no 'Result is : VALID|INVALID' line")
    if detail.get("result_validity") not in (None, verdict):
        raise BenchError(f"{log_dir}: summary says {verdict}, detail log says {detail['result_validity']}")
    return {
        "valid": verdict == "VALID",
        "result": verdict,
        "detail": detail,
        "summary": summary,
        "errors": errors,
        "log_dir": str(log_dir),
    }
