"""The 18 metrics on hand-built timelines, against values computed by hand in the comments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ds_bench.metrics import (
    METRICS,
    Counters,
    LatencyTargets,
    Request,
    Unavailable,
    compute,
    metrics_table_markdown,
    percentile,
)

# Four requests (seconds):
#   R1 arrives 0.0, tokens at 0.1 0.2 0.4, done 0.4   latency 0.4  ttft 0.1  tpot (0.4-0.1)/2 = 0.15
#   R2 arrives 0.5, tokens at 0.7 0.8,     done 0.9   latency 0.4  ttft 0.2  tpot (0.9-0.7)/1 = 0.2
#   R3 arrives 1.0, token  at 1.3,         done 1.3   latency 0.3  ttft 0.3  tpot none (one token)
#   R4 arrives 1.0, tokens at 1.1 1.2 1.3 1.4 2.0, done 2.0  latency 1.0  ttft 0.1  tpot (2.0-1.1)/4 = 0.225
REQUESTS = [
    Request(0.0, [0.1, 0.2, 0.4], 0.4, prompt_tokens=4),
    Request(0.5, [0.7, 0.8], 0.9, prompt_tokens=4),
    Request(1.0, [1.3], 1.3, prompt_tokens=4),
    Request(1.0, [1.1, 1.2, 1.3, 1.4, 2.0], 2.0, prompt_tokens=4),
]
COUNTERS = Counters(
    correct=3, predicted=8, reference_accuracy=50.0,
    nll_sum=4 * math.log(2), nll_tokens=2,
    energy_j=8.0, energy_window=2.5,
    peak_host_bytes=3 * 2**20, peak_device_bytes=2**30,
    load_to_first_output=1.25,
    prefill_flops=1e12, prefill_seconds=2.0, decode_bytes=3e9, decode_seconds=1.5,
    peak_flops=1e12, peak_bytes_per_s=1e10,
)  # fmt: skip


def test_registry_has_the_18_metrics_with_units_and_definitions():
    assert len(METRICS) == 18
    for name, m in METRICS.items():
        assert m.name == name and m.definition and callable(m.fn)
    assert {m.unit for m in METRICS.values()} >= {
        "%",
        "ms",
        "samples/s",
        "tokens/s",
        "J/sample",
        "W",
        "MiB",
        "s",
    }


def test_every_metric_on_the_hand_built_timeline():
    v = compute(REQUESTS, COUNTERS)
    assert v["accuracy"] == pytest.approx(37.5)  # 3 / 8
    assert v["accuracy_delta"] == pytest.approx(-12.5)  # 37.5 - 50
    assert v["perplexity"] == pytest.approx(4.0)  # exp(4 ln2 / 2)
    # latencies sorted: 0.3 0.4 0.4 1.0; index floor(p n): p50 -> 2, p90 -> 3, p99 -> 3
    assert v["latency_p50"] == pytest.approx(400.0)
    assert v["latency_p90"] == pytest.approx(1000.0)
    assert v["latency_p99"] == pytest.approx(1000.0)
    assert v["ttft"] == pytest.approx(175.0)  # mean(0.1, 0.2, 0.3, 0.1)
    assert v["tpot"] == pytest.approx(1e3 * (0.15 + 0.2 + 0.225) / 3)  # R3 has one token
    # gaps: R1 0.1 0.2, R2 0.1, R4 0.1 0.1 0.1 0.6 -> sorted 7 values, index floor(0.99*7) = 6 -> 0.6
    assert v["itl_p99"] == pytest.approx(600.0)
    assert v["samples_per_s"] == pytest.approx(2.0)  # 4 requests over 0.0 .. 2.0
    assert v["tokens_per_s"] == pytest.approx(5.5)  # 3 + 2 + 1 + 5 tokens
    assert isinstance(v["goodput"], Unavailable)  # no targets
    assert v["energy_per_sample"] == pytest.approx(2.0)  # 8 J / 4
    assert v["samples_per_joule"] == pytest.approx(0.5)
    assert v["average_power"] == pytest.approx(3.2)  # 8 J / 2.5 s
    assert v["peak_memory"] == pytest.approx({"host": 3.0, "device": 1024.0})
    assert v["load_time"] == pytest.approx(1.25)
    assert v["hardware_utilisation"] == pytest.approx({"mfu_prefill": 50.0, "mbu_decode": 20.0})


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (LatencyTargets(ttft=0.15), 1.0),  # R1, R4
        (LatencyTargets(tpot=0.21), 1.5),  # R1, R2, R3 (no TPOT to miss); R4 0.225 misses
        (LatencyTargets(latency=0.41), 1.5),  # R1, R2, R3
        (LatencyTargets(ttft=0.21, tpot=0.21), 1.0),  # R1, R2
        (LatencyTargets(latency=0.01), 0.0),
    ],
)
def test_goodput_counts_requests_meeting_every_target(targets, expected):
    c = Counters(targets=targets)
    assert METRICS["goodput"].fn(REQUESTS, c) == pytest.approx(expected)


def test_percentile_is_loadgens_rule_not_interpolation():
    values = list(range(1, 11))  # 1..10
    assert percentile(values, 0.5) == 6  # index floor(5.0) = 5; numpy's linear rule would give 5.5
    assert percentile(values, 0.9) == 10
    assert percentile(values, 0.99) == 10
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_unavailable_metrics_carry_a_reason():
    v = compute([], Counters())
    for name, value in v.items():
        assert isinstance(value, Unavailable), name
        assert value.reason, name
    assert "energy" in v["energy_per_sample"].reason
    assert "reference" in compute(REQUESTS, Counters(correct=1, predicted=2))["accuracy_delta"].reason


def test_energy_unavailable_reason_propagates_unchanged():
    c = Counters(energy_j=Unavailable("no energy counter: test"), energy_window=1.0)
    v = compute(REQUESTS, c)
    for name in ("energy_per_sample", "samples_per_joule", "average_power"):
        assert v[name] == Unavailable("no energy counter: test")


def test_single_token_requests_have_no_tpot_or_itl():
    reqs = [Request(0.0, [0.5], 0.5), Request(0.1, [0.7], 0.8)]
    v = compute(reqs, Counters())
    assert isinstance(v["tpot"], Unavailable) and isinstance(v["itl_p99"], Unavailable)
    assert v["ttft"] == pytest.approx(550.0)
    assert v["tokens_per_s"] == pytest.approx(2 / 0.8)


def test_hardware_utilisation_reports_the_part_it_can():
    c = Counters(prefill_flops=2e9, prefill_seconds=1.0, peak_flops=1e10)
    assert METRICS["hardware_utilisation"].fn(REQUESTS, c) == pytest.approx({"mfu_prefill": 20.0})
    out = METRICS["hardware_utilisation"].fn(REQUESTS, Counters())
    assert isinstance(out, Unavailable) and "peak" in out.reason


def test_docs_table_lists_every_metric():
    table = metrics_table_markdown()
    assert table.count("\n") == 18 + 1  # header, rule, 18 rows
    docs = Path(__file__).resolve().parents[3] / "docs" / "packages" / "ds-bench.md"
    text = docs.read_text(encoding="utf-8")
    for name in METRICS:
        assert f"`{name}`" in text, name
    assert table in text  # the docs table is the registry's own rendering
