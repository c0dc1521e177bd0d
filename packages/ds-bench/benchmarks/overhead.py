"""Measurement overhead of the harness itself, against a 1 ms operation (target: <= 2 %).

A "decode step" that busy-waits exactly 1 ms is timed three ways, interleaved, best of several repeats:

  bare       a plain loop of the op; per-op durations from consecutive clock reads
  harness    the same steps through Backend.generate -> PhaseMeter (per-step clock, FLOP/byte tallies) ->
             the LoadGen SUT's per-step recording (the path every measured token takes)
  loadgen    1-token queries of 1 ms each through a real LoadGen SingleStream run: LoadGen's own
             issue / complete round trip per query on top (reported separately: it is MLPerf's cost)

Medians of per-op durations, so that preemption on a busy machine (which stretches some ops) does not
decide the answer; plus the instrumentation alone, timed with an empty op over many steps.

    python packages/ds-bench/benchmarks/overhead.py [--steps 1000] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time

from ds_bench.backends import Backend, ModelFacts
from ds_bench.runner import PhaseMeter
from ds_bench.scenarios import ScenarioSettings, run_scenario

OP = 1e-3


def busy(seconds: float = OP) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class BusyBackend(Backend):
    """Each step (the prefill and every decode step) is one 1 ms busy-wait."""

    name = "busy"
    facts = ModelFacts(params=1, matmul_params=1, matmul_weight_bytes=1, n_layers=1, d_attn=1,
                       kv_bytes_per_token=1, vocab_size=2, dtype="fp32")  # fmt: skip

    def load(self, model_dir):
        pass

    op = OP

    def generate(self, prompts, max_new_tokens, on_step):
        for i in range(max_new_tokens):
            busy(self.op)
            on_step(i, [0] * len(prompts), time.perf_counter())

    def logits(self, ids):
        raise NotImplementedError


def bare(steps: int, op: float = OP) -> list[float]:
    """Per-op durations of a plain loop: gaps between consecutive clock reads."""
    stamps = [time.perf_counter()]
    for _ in range(steps):
        busy(op)
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


def harness(steps: int, op: float = OP) -> list[float]:
    """Per-step durations through Backend.generate -> PhaseMeter -> the SUT's per-step recording."""
    backend = BusyBackend()
    backend.op = op
    meter = PhaseMeter(backend)
    times: list[float] = []
    tokens: list[int] = []

    def on_step(i, toks, t):  # what the LoadGen SUT does per step
        times.append(t)
        tokens.extend(toks)

    meter.generate([[1, 2, 3, 4]], steps, on_step)
    return [b - a for a, b in itertools.pairwise(times)]


def loadgen(queries: int) -> float:
    """LoadGen SingleStream, 1-token queries of one op each: LoadGen's median query latency."""
    settings = ScenarioSettings("singlestream", gen_tokens=1, min_duration=0.0, min_query_count=queries,
                                expected_latency=OP)  # fmt: skip
    settings.max_duration = 60.0
    with tempfile.TemporaryDirectory() as d:
        out = run_scenario(BusyBackend(), [[1, 2, 3, 4]], settings, d)
    return out.loadgen["detail"]["result_50.00_percentile_latency_ns"] / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    # Medians of per-op durations: a preempted op (busy machine) moves the mean, not the median.
    b, h, lg, zb, zh = [], [], [], [], []
    for _ in range(args.repeats):
        b += bare(args.steps)
        h += harness(args.steps)
        lg.append(loadgen(500))
        zb += bare(20 * args.steps, op=0.0)  # the instrumentation alone, no work in the op
        zh += harness(20 * args.steps, op=0.0)
    med = statistics.median
    out = {
        "op_ms": OP * 1e3,
        "bare_median_ms": med(b) * 1e3,
        "harness_median_ms": med(h) * 1e3,
        "harness_overhead_pct": 100 * (med(h) - med(b)) / OP,
        "instrumentation_per_step_us": (med(zh) - med(zb)) * 1e6,
        "instrumentation_pct_of_op": 100 * (med(zh) - med(zb)) / OP,
        "loadgen_query_median_ms": med(lg) * 1e3,
        "loadgen_overhead_pct": 100 * (med(lg) - med(b)) / OP,
        "target_pct": 2.0,
    }
    out["harness_within_target"] = max(out["harness_overhead_pct"], out["instrumentation_pct_of_op"]) <= 2.0
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
