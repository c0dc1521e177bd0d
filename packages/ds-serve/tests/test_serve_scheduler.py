"""The scheduler in-process, on the real model: greedy parity, admission order, budget, timeouts."""

from __future__ import annotations

import threading

import pytest

from ds_models import generate
from ds_serve.scheduler import Request, Scheduler, SchedulerConfig, ServeError

PROMPTS = [[5, 6, 7, 8, 9], [17, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48], [3], [100, 200, 300]]
LENGTHS = [20, 5, 12, 30, 8]


def run_all(scheduler: Scheduler, reqs: list[Request], timeout: float = 60) -> list[Request]:
    done = [threading.Event() for _ in reqs]
    for req, ev in zip(reqs, done):
        req.on_event = lambda tok, ev=ev: ev.set() if tok is None else None
        scheduler.submit(req)
    for ev in done:
        assert ev.wait(timeout)
    return reqs


@pytest.mark.parametrize("batching", ["continuous", "fixed"])
def test_greedy_outputs_match_generate(tiny, batching):
    model = tiny[0]
    scheduler = Scheduler(model, SchedulerConfig(max_batch=3, batching=batching))
    try:
        reqs = run_all(scheduler, [Request(prompt=p, max_tokens=n) for p, n in zip(PROMPTS, LENGTHS)])
    finally:
        scheduler.shutdown()
    assert [r.tokens for r in reqs] == [generate(model, [p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    assert all(r.finish_reason == "length" for r in reqs)


def test_continuous_admits_mid_batch_fixed_waits(tiny):
    """Two rows; a long and a short request run, a third waits. Continuous batching starts it when the
    short one leaves; fixed batching only after the long one has finished too."""
    order = {}
    for batching in ("continuous", "fixed"):
        scheduler = Scheduler(tiny[0], SchedulerConfig(max_batch=2, batching=batching, batch_wait_s=0.5))
        try:
            reqs = run_all(scheduler, [Request(prompt=[1, 2], max_tokens=120), Request(prompt=[3], max_tokens=2),
                                       Request(prompt=[4], max_tokens=2)])  # fmt: skip
        finally:
            scheduler.shutdown()
        # (third starts before the long one ends, the short one is answered before the long one)
        order[batching] = (
            reqs[2].first_token_at < reqs[0].finished_at,
            reqs[1].finished_at < reqs[0].finished_at,
        )
        assert [len(r.tokens) for r in reqs] == [120, 2, 2]
    # Fixed batching answers a batch together, when its longest request is done.
    assert order == {"continuous": (True, True), "fixed": (False, False)}


def test_token_budget_keeps_fcfs_order(tiny):
    # Budget for one 100-token request at a time: the second (needing 100) waits for the first although a
    # row is free, and the small third may not overtake it.
    scheduler = Scheduler(tiny[0], SchedulerConfig(max_batch=4, token_budget=110))
    try:
        a, b, c = run_all(scheduler, [Request(prompt=[1] * 10, max_tokens=90), Request(prompt=[2] * 10, max_tokens=90),
                                      Request(prompt=[3], max_tokens=2)])  # fmt: skip
    finally:
        scheduler.shutdown()
    assert a.finished_at <= b.first_token_at
    assert b.first_token_at <= c.first_token_at


def test_rejects_what_cannot_fit(tiny):
    scheduler = Scheduler(tiny[0], SchedulerConfig(max_batch=1, max_len=64, max_queue=1))
    try:
        with pytest.raises(ServeError, match="maximum context length is 64") as e:
            scheduler.submit(Request(prompt=[1] * 60, max_tokens=10))
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"
        with pytest.raises(ServeError, match="token ids"):
            scheduler.submit(Request(prompt=[10**6], max_tokens=1))
        with pytest.raises(ServeError, match="batching"):
            SchedulerConfig(batching="dynamic")
    finally:
        scheduler.shutdown()


def test_timeout_cancel_and_shutdown(tiny):
    scheduler = Scheduler(tiny[0], SchedulerConfig(max_batch=1, request_timeout_s=1e-6))
    (r,) = run_all(scheduler, [Request(prompt=[1], max_tokens=5)])
    scheduler.shutdown()
    assert r.finish_reason == "timeout" and "timed out" in r.error and not r.tokens

    scheduler = Scheduler(tiny[0], SchedulerConfig(max_batch=1))
    long = Request(
        prompt=[1], max_tokens=1500, on_event=lambda tok: long.cancel() if tok is not None else None
    )
    done = threading.Event()
    waiting = Request(prompt=[2], max_tokens=3, on_event=lambda tok: done.set() if tok is None else None)
    scheduler.submit(long)
    scheduler.submit(waiting)
    assert done.wait(30)  # the cancelled request gave its only row to the waiting one
    assert long.finish_reason == "cancelled" and len(long.tokens) < 5
    assert waiting.finish_reason == "length"
    scheduler.shutdown()
    with pytest.raises(ServeError, match="shutting down") as e:
        scheduler.submit(Request(prompt=[1], max_tokens=1))
    assert e.value.status == 503
