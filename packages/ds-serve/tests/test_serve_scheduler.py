"""The scheduler in-process, on the real model: greedy parity (whole, chunked and mixed prefill), row
compaction, admission order, budget, timeouts."""

from __future__ import annotations

import threading

import pytest
import torch

from ds_models import generate
from ds_serve.engine import TorchEngine
from ds_serve.scheduler import Request, Scheduler, SchedulerConfig, ServeError

PROMPTS = [[5, 6, 7, 8, 9], [17, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48], [3], [100, 200, 300],
           list(range(60, 90))]  # fmt: skip
LENGTHS = [20, 5, 12, 30, 8, 10]


@pytest.fixture
def run_all(run_requests):
    return run_requests


# (batching, prefill, step_tokens): whole prompts; chunks of <= 4 prompt tokens per step (a 30-token
# prompt takes 8 steps while the others decode), separately and mixed into the decode forward.
CASES = [("continuous", "separate", 512), ("fixed", "separate", 512), ("continuous", "separate", 4),
         ("continuous", "mixed", 512), ("continuous", "mixed", 4), ("fixed", "mixed", 5)]  # fmt: skip


@pytest.mark.parametrize(("batching", "prefill", "step_tokens"), CASES)
def test_greedy_outputs_match_generate(tiny, run_all, batching, prefill, step_tokens):
    """Rows join, leave (their row refilled by compaction) and prefill in chunks: tokens stay generate's."""
    model = tiny[0]
    config = SchedulerConfig(max_batch=3, batching=batching, prefill=prefill, step_tokens=step_tokens)
    scheduler = Scheduler(model, config)
    try:
        reqs = run_all(scheduler, [Request(prompt=p, max_tokens=n) for p, n in zip(PROMPTS, LENGTHS)])
    finally:
        scheduler.shutdown()
    assert [r.tokens for r in reqs] == [generate(model, [p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    assert all(r.finish_reason == "length" for r in reqs)


def test_long_prompt_does_not_stall_decoding(tiny):
    """A 60-token prompt arriving while a request decodes is prefilled 4 tokens per step: the running
    request gets a token at every one of those 15 steps instead of waiting for one long prefill."""
    scheduler = Scheduler(tiny[0], SchedulerConfig(max_batch=2, step_tokens=4))
    steps = []
    scheduler.observer = lambda event, data: steps.append(data["batch"]) if event == "step" else None
    started, finished, seen = threading.Event(), threading.Event(), []
    running = Request(prompt=[1, 2], max_tokens=200)
    running.on_event = lambda tok: started.set() if len(running.tokens) >= 3 else None
    long = Request(prompt=list(range(100, 160)), max_tokens=3)
    long.on_event = lambda tok: finished.set() if tok is None else seen.append(len(running.tokens))
    try:
        scheduler.submit(running)
        assert started.wait(30)
        before = len(running.tokens)
        scheduler.submit(long)
        assert finished.wait(60)
    finally:
        scheduler.shutdown()
    assert long.tokens == generate(tiny[0], [long.prompt], 3)[0]
    gained = seen[0] - before  # tokens the running request got while the long prompt was prefilled
    assert 14 <= gained <= 17, gained
    assert max(steps) == 2


def test_release_compacts_rows(tiny):
    """Slot 0 leaves: the top row (slot 2) moves into row 0, and decoding it still gives the logits of a
    request that never moved."""
    model = tiny[0]
    prompts = {0: [5, 6, 7], 1: [9, 10, 11, 12], 2: [40, 41, 42, 43, 44]}
    engine = TorchEngine(model, 3, 64)
    engine.step([(s, p, 0) for s, p in prompts.items()])
    engine.release(0)
    assert engine.row_of == {1: 1, 2: 0}
    moved = engine.step([(2, [7], 5), (1, [3], 4)])[0]
    alone = TorchEngine(model, 1, 64)
    alone.step([(0, prompts[2], 0)])
    torch.testing.assert_close(moved, alone.step([(0, [7], 5)])[0], rtol=1e-4, atol=1e-4)
    reference = model(torch.tensor([prompts[2] + [7]]))[0, -1]
    torch.testing.assert_close(moved, reference, rtol=1e-4, atol=1e-4)


def test_continuous_admits_mid_batch_fixed_waits(tiny, run_all):
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


def test_token_budget_keeps_fcfs_order(tiny, run_all):
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


def test_timeout_cancel_and_shutdown(tiny, run_all):
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


def test_sampling_in_groups_keeps_rows_and_seeds(tiny, run_all):
    """Rows are sampled per group of settings: top_k=1 rows of one group must each get their own greedy
    continuation (a row mix-up would swap them), and a seeded request samples what it samples alone."""
    model = tiny[0]

    def run(reqs):
        scheduler = Scheduler(model, SchedulerConfig(max_batch=5))
        try:
            return run_all(scheduler, reqs)
        finally:
            scheduler.shutdown()

    (alone,) = run([Request(prompt=[5, 6, 7], max_tokens=12, temperature=1.3, seed=7)])
    reqs = run([Request(prompt=[5, 6, 7], max_tokens=12, temperature=1.3, seed=7),
                Request(prompt=[9], max_tokens=12),
                Request(prompt=[40, 41], max_tokens=12, temperature=0.8, top_k=1),
                Request(prompt=[100, 200, 300], max_tokens=12, temperature=0.8, top_k=1),
                Request(prompt=[3, 4], max_tokens=12, temperature=0.8)])  # fmt: skip
    assert reqs[0].tokens == alone.tokens
    for r in reqs[1:4]:
        assert r.tokens == generate(model, [r.prompt], 12)[0]
    assert len(reqs[4].tokens) == 12 and all(0 <= t < model.config.vocab_size for t in reqs[4].tokens)
