"""The serving benchmark's statistics (benchmarks/serving_stats.py): metric definitions and SLO search."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_stats.py"
_spec = importlib.util.spec_from_file_location("ds_serve_bench_serving_stats", _PATH)
stats = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = stats  # dataclasses look their module up there
_spec.loader.exec_module(stats)


def test_request_metrics_follow_vllm_definitions():
    # Sent at 10.0; first token at 10.5, then one token every 0.1 s, the last text chunk at 10.8,
    # and the closing chunk (finish_reason, no text) only at 12.0, as a static batch answers.
    choice = [10.5, 10.6, 10.7, 10.8, 12.0]
    text = [10.5, 10.6, 10.7, 10.8]
    m = stats.request_metrics(10.0, choice, text, 4)
    assert m["ttft"] == pytest.approx(0.5)
    assert m["e2e"] == pytest.approx(2.0)
    assert m["tpot"] == pytest.approx((2.0 - 0.5) / 3)  # to the end of the stream, as vLLM
    assert m["decode_tpot"] == pytest.approx(0.3 / 3)  # while text arrives
    assert m["norm_latency"] == pytest.approx(0.5)
    assert m["itl_max"] == pytest.approx(1.2)
    one = stats.request_metrics(0.0, [0.2], [0.2], 1)
    assert one["tpot"] is None and one["decode_tpot"] is None and one["e2e"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        stats.request_metrics(0.0, [], [], 3)


def test_summaries_std_reduction_and_none_tpots():
    xs = [0.1 * i for i in range(1, 101)]
    s = stats.summarize([*xs, None])
    assert s["mean"] == pytest.approx(np.mean(xs))
    assert s["std"] == pytest.approx(np.std(xs))  # population std, as vLLM
    assert s["p99"] == pytest.approx(np.percentile(xs, 99)) and s["p50"] == pytest.approx(5.05)
    assert stats.summarize([None]) is None
    reqs = [{"ttft": t, "tpot": None, "e2e": 2 * t, "norm_latency": t, "decode_tpot": None} for t in (1, 3)]
    summary = stats.summarize_requests(reqs)
    assert summary["n"] == 2 and summary["tpot"] is None and summary["e2e"]["std"] == pytest.approx(2.0)
    half = stats.summarize_requests([{**r, "e2e": r["e2e"] / 2 + 5} for r in reqs])
    red = stats.std_reduction(half, summary)
    assert red["e2e"] == pytest.approx(0.5) and red["ttft"] == pytest.approx(0.0) and red["tpot"] is None


def _point(ttft99, tpot99, e2e99=1.0):
    return {m: {"p99": v, "std": 0.0} for m, v in (("ttft", ttft99), ("tpot", tpot99), ("e2e", e2e99))}


def test_slo_scaling_and_highest_sustained_rate():
    slo = stats.scaled_slo("tight", 0.02, 0.01, ttft_x=5, tpot_x=3)
    assert (slo.ttft, slo.tpot, slo.e2e) == (pytest.approx(0.1), pytest.approx(0.03), None)
    assert slo.met(_point(0.1, 0.03)) and not slo.met(_point(0.11, 0.01)) and not slo.met(_point(0.05, 0.031))
    assert not slo.met({"ttft": _point(0.01, 0)["ttft"], "tpot": None})  # no TPOT measured: not shown
    e2e = stats.scaled_slo("e2e", 0.02, 0.01, e2e0=1.0, e2e_x=3)
    assert e2e.met(_point(9, 9, 3.0)) and not e2e.met(_point(0, 0, 3.01))
    # Unordered points; passing again at 4.0 after failing at 3.0 does not count as sustained.
    points = [(4.0, _point(0.05, 0.01)), (1.0, _point(0.05, 0.01)), (3.0, _point(0.2, 0.01)),
              (2.0, _point(0.09, 0.02))]  # fmt: skip
    assert stats.max_rate_meeting(points, slo) == (2.0, 3.0)
    assert stats.max_rate_meeting(points[:2], slo) == (4.0, None)  # never failed: a lower bound
    assert stats.max_rate_meeting([(1.0, _point(1, 1))], slo) == (0.0, 1.0)


def test_queries_per_point_fits_the_budget():
    # Two modes of capacity 10 and 5 /s at rates 2, 5, 10: per query 1/2+1/5+1/10 + 1/2+1/5+1/5 s.
    n = stats.queries_per_point(170.0, [2.0, 5.0, 10.0], [10.0, 5.0], lo=10, hi=10_000)
    assert n == int(170.0 / 1.7)
    assert stats.queries_per_point(1.0, [1.0], [1.0], lo=100) == 100
    assert stats.queries_per_point(1e9, [1.0], [1.0], hi=1000) == 1000
