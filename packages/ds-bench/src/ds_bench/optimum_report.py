"""Export a ds-bench result as an optimum-benchmark report (benchmark_report.json).

optimum-benchmark's text-generation inference scenario reports four targets, each a `Measurements`
of memory / latency / throughput / energy / efficiency (optimum_benchmark/benchmark/report.py and
trackers/*.py). The mapping from ds-bench's per-request records:

  load_model  latency: [load time to first output]
  prefill     latency: each request's TTFT; throughput: batch x prompt tokens / mean TTFT (tokens/s)
  decode      latency: each request's completion - first token; throughput: batch x (tokens - 1) /
              mean of it (tokens/s); energy and efficiency per request (kWh, tokens/kWh)
  per_token   latency: every inter-token gap; throughput: batch / mean gap (tokens/s)
  memory      on prefill and decode: max_ram (host peak) and max_allocated (device peak), in MB

optimum-benchmark's statistics use numpy's linear-interpolation percentiles, so these do too (they
can differ slightly from ds-bench's LoadGen-rule percentiles on small samples). Energy that ds-bench
could not measure is null, never zero.
"""

from __future__ import annotations

import numpy as np

from ds_bench.metrics import inter_token_latencies
from ds_bench.result import metric_value, records


def _latency(values: list[float]) -> dict | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    std = float(v.std()) if len(v) > 1 else 0.0
    return {
        "unit": "s", "values": [float(x) for x in v], "count": len(v), "total": float(v.sum()), "mean": mean,
        "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "p95": float(np.percentile(v, 95)),
        "p99": float(np.percentile(v, 99)), "stdev": std, "stdev_": 100.0 * std / abs(mean) if len(v) > 1 and mean else 0.0,
    }  # fmt: skip


def _throughput(volume: float, latency: dict | None, unit: str = "tokens/s") -> dict | None:
    if latency is None or latency["mean"] <= 0:
        return None
    return {"unit": unit, "value": volume / latency["mean"]}


def _measurements(**kw) -> dict:
    return {k: kw.get(k) for k in ("memory", "latency", "throughput", "energy", "efficiency")}


def to_optimum_report(result: dict) -> dict:
    recs = records(result)
    settings = result["settings"]
    batch = int(settings.get("batch_size", 1))
    prompt = int(settings.get("prompt_len", 0))
    tokens = int(settings.get("gen_tokens", 1))
    peak = metric_value(result, "peak_memory") or {}
    memory = None
    if peak:
        memory = {
            "unit": "MB",
            "max_ram": peak["host"] * 2**20 / 1e6 if "host" in peak else None,
            "max_global_vram": None,
            "max_process_vram": None,
            "max_reserved": None,
            "max_allocated": peak["device"] * 2**20 / 1e6 if "device" in peak else None,
        }
    load = metric_value(result, "load_time")

    prefill_lat = _latency([r.ttft for r in recs if r.ttft is not None])
    decode_lat = _latency([r.completion - r.token_times[0] for r in recs if r.tokens >= 2])
    per_token_lat = _latency(inter_token_latencies(recs))

    energy = efficiency = None
    per_sample_j = metric_value(result, "energy_per_sample")
    if per_sample_j is not None:
        kwh = per_sample_j / 3.6e6
        on_gpu = result["device"].get("type") == "cuda"
        energy = {
            "unit": "kWh",
            "cpu": 0.0 if on_gpu else kwh,
            "ram": 0.0,
            "gpu": kwh if on_gpu else 0.0,
            "total": kwh,
        }
        efficiency = {"unit": "tokens/kWh", "value": tokens / kwh} if kwh > 0 else None

    return {
        "load_model": _measurements(latency=_latency([load]) if load is not None else None),
        "prefill": _measurements(
            memory=memory, latency=prefill_lat, throughput=_throughput(batch * prompt, prefill_lat)
        ),
        "decode": _measurements(
            memory=memory,
            latency=decode_lat,
            throughput=_throughput(batch * (tokens - 1), decode_lat),
            energy=energy,
            efficiency=efficiency,
        ),
        "per_token": _measurements(latency=per_token_lat, throughput=_throughput(batch, per_token_lat)),
    }
