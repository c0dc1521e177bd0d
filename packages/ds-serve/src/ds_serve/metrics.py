"""Prometheus metrics of one server, in their own registry (several apps may live in one process)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ds_serve.scheduler import Request, Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ds_serve_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.errors = Counter(
            "ds_serve_errors", "Failed requests, by OpenAI error type", ["type"], registry=r
        )
        self.finished = Counter("ds_serve_finished", "Generations ended, by reason (stop, length, "
                                "cancelled, timeout, shutdown, error)", ["reason"], registry=r)  # fmt: skip
        self.queue_length = Gauge("ds_serve_queue_length", "Requests waiting for a KV-cache slot", registry=r)
        self.running = Gauge("ds_serve_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Histogram("ds_serve_batch_size", "Rows per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.ttft = Histogram("ds_serve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("ds_serve_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("ds_serve_request_latency_seconds", "Arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("ds_serve_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated = Counter("ds_serve_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge("ds_serve_tokens_per_second", "Tokens generated per second, last 10 s",
                                  registry=r)  # fmt: skip
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def bind(self, scheduler: Scheduler) -> None:
        self.queue_length.set_function(scheduler.queue_length)
        self.running.set_function(scheduler.batch_size)
        self.tokens_per_s.set_function(self._rate)

    def observe(self, event: str, data: dict) -> None:
        """The scheduler's observer (called on the model thread)."""
        if event == "step":
            self.batch_size.observe(data["batch"])
        elif event == "finish":
            self._finished(data["request"])
        elif event == "error":
            self.errors.labels(type="model_error").inc()

    def _finished(self, req: Request) -> None:
        self.finished.labels(reason=req.finish_reason).inc()
        n = len(req.tokens)
        if n:
            self.prompt_tokens.inc(len(req.prompt))
            self.generated.inc(n)
            with self._lock:
                self._window.append((time.monotonic(), n))
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.arrival)
            if n > 1 and req.finished_at is not None:
                self.tpot.observe((req.finished_at - req.first_token_at) / (n - 1))
        if req.finish_reason in ("stop", "length") and req.finished_at is not None:
            self.latency.observe(req.finished_at - req.arrival)

    def _rate(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - window_s:
                self._window.popleft()
            return sum(n for _, n in self._window) / window_s
