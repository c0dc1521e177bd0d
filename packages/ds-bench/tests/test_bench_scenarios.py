"""The real MLPerf LoadGen drives ds-tiny: VALID in every scenario, verdicts and logs read back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ds_bench.backends import Backend, make_backend
from ds_bench.errors import BenchError
from ds_bench.result import records
from ds_bench.runner import RunConfig, run
from ds_bench.scenarios import (
    ScenarioSettings,
    early_stopping_min_passing,
    early_stopping_queries,
    parse_loadgen_logs,
    run_scenario,
)

pytest.importorskip("mlperf_loadgen")


def short(model: Path, scenario: str, **kw) -> RunConfig:
    settings = dict(
        model=str(model), scenario=scenario, samples=16, prompt_len=16, gen_tokens=4, batch_size=4,
        min_duration=0.3, eval_tokens=256, eval_seq_len=64,
    )  # fmt: skip
    settings.update(kw)
    return RunConfig(**settings)


@pytest.mark.parametrize("scenario", ["singlestream", "server", "offline"])
def test_loadgen_run_is_valid(tiny_dir, tmp_path, scenario):
    # Every LoadGen setting at its default: query counts from early stopping, and for the server the
    # rate and the TTFT / TPOT targets from the calibration. VALID by design, not by generous flags.
    # Server: 8 tokens per request, so that TPOT averages over 7 steps and a millisecond model's TPOT is
    # not decided by one scheduler hiccup of this shared 2-core machine.
    result = run(
        short(tiny_dir, scenario, gen_tokens=8 if scenario == "server" else 4), log_dir=tmp_path / "lg"
    )
    lg = result["loadgen"]
    assert result["valid"] is True and lg["result"] == "VALID", (lg["detail"], result["calibration"])
    assert lg["detail"]["result_validity"] == "VALID"
    assert (
        lg["detail"]["effective_scenario"]
        == {"singlestream": "SingleStream", "server": "Server", "offline": "Offline"}[scenario]
    )
    assert (tmp_path / "lg" / "mlperf_log_summary.txt").exists()
    reqs = records(result)
    # Every sample LoadGen issued was served and recorded, with all its tokens.
    if scenario == "offline":
        assert len(reqs) == lg["detail"]["effective_samples_per_query"]
    else:
        need = early_stopping_queries(scenario, 0.9)  # 64 (singlestream), 113 (server)
        assert lg["detail"]["effective_min_query_count"] == need
        assert len(reqs) == lg["detail"]["result_query_count"] >= need
    assert all(r.tokens == result["settings"]["gen_tokens"] for r in reqs)
    assert result["metrics"]["latency_p99"]["value"] >= result["metrics"]["latency_p50"]["value"] > 0
    if scenario == "server":
        assert lg["detail"]["early_stopping_met"] is True
        assert result["metrics"]["goodput"]["value"] > 0  # judged by the server's targets
        cal = result["calibration"]
        assert lg["detail"]["effective_target_qps"] == pytest.approx(
            0.35 / cal["single_request_median_s"], rel=1e-2
        )
        assert result["targets"]["ttft"] == pytest.approx(5 * cal["batch_median_s"])


def test_early_stopping_counts_are_loadgens():
    # LoadGen's own numbers (early_stopping.cc / results.cc): 44 queries pass p90 with none over
    # latency, 459 at p99; SingleStream needs h(1) + 1 = 64 (p90) and 662 (p99).
    assert early_stopping_min_passing(0, 0.9) == 44 and early_stopping_min_passing(0, 0.99) == 459
    assert early_stopping_queries("singlestream", 0.9) == 64
    assert early_stopping_queries("singlestream", 0.99) == 662
    assert [early_stopping_min_passing(t, 0.9) + t for t in range(5)] == [44, 64, 81, 97, 113]
    assert early_stopping_queries("server", 0.9) == 113 and early_stopping_queries("offline", 0.9) == 1
    assert ScenarioSettings("server", latency_percentile=0.95).min_query_count == 229
    assert ScenarioSettings("server", min_query_count=10).min_query_count == 10


class Sleepy(Backend):
    """One token per request in `fast` seconds; the `slow_call`-th request takes `slow` seconds."""

    name = "sleepy"

    def __init__(self, fast: float, slow: float, slow_call: int) -> None:
        super().__init__()
        self.fast, self.slow, self.slow_call, self.calls = fast, slow, slow_call, 0

    def load(self, model_dir):
        pass

    def generate(self, prompts, max_new_tokens, on_step):
        self.calls += 1
        time.sleep(self.slow if self.calls == self.slow_call else self.fast)
        for i in range(max_new_tokens):
            on_step(i, [0] * len(prompts), time.perf_counter())

    def logits(self, ids):
        raise NotImplementedError


@pytest.mark.parametrize("min_queries", [30, 200])
def test_server_early_stopping_verdict_matches_loadgen(tmp_path, min_queries):
    # One slow request (and whatever queues behind it) goes over the 50 ms target: t >= 1 over-latency
    # queries. LoadGen's early-stopping verdict, and how many more queries it asks for, must be our rule.
    settings = ScenarioSettings(
        "server", gen_tokens=1, batch_size=1, min_duration=0.1, min_query_count=min_queries,
        target_qps=100.0, target_latency=0.05,
    )  # fmt: skip
    out = run_scenario(Sleepy(fast=0.001, slow=0.12, slow_call=5), [[1, 2]], settings, tmp_path / "lg")
    det = out.loadgen["detail"]
    n, t = det["result_query_count"], det["result_overlatency_query_count"]
    assert t >= 1
    need = early_stopping_min_passing(t, 0.9) + t
    assert det["early_stopping_met"] is (n >= need)
    if n < need:
        assert f"Would need to run at least {need - n} more queries" in det["early_stopping_result"]
        assert out.valid is False
    if min_queries == 30:
        assert n < need  # 30 queries cannot absorb even one over-latency query at p90


def test_singlestream_ttft_agrees_with_loadgens_clock(tiny_dir, tmp_path):
    result = run(short(tiny_dir, "singlestream"), log_dir=tmp_path / "lg")
    ours = result["metrics"]["ttft"]["value"]  # ms, from LoadGen's issue callback
    theirs = result["loadgen"]["detail"]["result_first_token_mean_latency_ns"] / 1e6  # from its schedule
    assert theirs == pytest.approx(ours, rel=0.5, abs=5.0)


def test_invalid_verdict_is_kept(tiny_dir, tmp_path):
    backend = make_backend("torch")
    backend.load(tiny_dir)
    prompts = [[1] * 8] * 4
    # Offline sized for 1 sample/s over 2 s: LoadGen issues 2 samples, done in milliseconds.
    settings = ScenarioSettings("offline", gen_tokens=2, batch_size=4, min_duration=2.0, expected_qps=1.0)
    out = run_scenario(backend, prompts, settings, tmp_path / "lg")
    assert out.valid is False and out.loadgen["result"] == "INVALID"
    assert out.loadgen["detail"]["result_min_duration_met"] is False
    assert len(out.records) == out.loadgen["detail"]["effective_samples_per_query"]


class Broken(Backend):
    name = "broken"

    def load(self, model_dir):
        pass

    def generate(self, prompts, max_new_tokens, on_step):
        raise RuntimeError("device lost")

    def logits(self, ids):
        raise RuntimeError("device lost")


def test_backend_failure_ends_the_run_with_its_error(tmp_path):
    settings = ScenarioSettings(
        "singlestream", gen_tokens=2, min_duration=0.1, min_query_count=4, expected_latency=0.001
    )
    with pytest.raises(RuntimeError, match="device lost"):
        run_scenario(Broken(), [[1, 2]], settings, tmp_path / "lg")  # raises instead of hanging LoadGen


def test_bad_settings_and_missing_logs(tmp_path):
    with pytest.raises(BenchError, match="--scenario: unknown 'multistream'"):
        ScenarioSettings("multistream")
    with pytest.raises(BenchError, match="latency-percentile"):
        ScenarioSettings("server", latency_percentile=1.5)
    with pytest.raises(BenchError, match=r"mlperf_log_detail\.txt"):
        parse_loadgen_logs(tmp_path)
