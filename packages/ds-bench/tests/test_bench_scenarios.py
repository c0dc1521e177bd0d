"""The real MLPerf LoadGen drives ds-tiny: VALID in every scenario, verdicts and logs read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_bench.backends import Backend, make_backend
from ds_bench.errors import BenchError
from ds_bench.result import records
from ds_bench.runner import RunConfig, run
from ds_bench.scenarios import ScenarioSettings, parse_loadgen_logs, run_scenario

pytest.importorskip("mlperf_loadgen")


def short(model: Path, scenario: str, **kw) -> RunConfig:
    settings = dict(
        model=str(model), scenario=scenario, samples=16, prompt_len=16, gen_tokens=4, batch_size=4,
        min_duration=0.3, eval_tokens=256, eval_seq_len=64,
    )  # fmt: skip
    settings.update(kw)
    return RunConfig(**settings)


@pytest.mark.parametrize(
    ("scenario", "extra"),
    [
        ("singlestream", {}),
        # Generous targets and a modest rate: the point is a VALID run on a shared 2-core machine.
        ("server", dict(target_qps=25.0, target_ttft_ms=5000.0, target_tpot_ms=2000.0)),
        ("offline", {}),
    ],
)
def test_loadgen_run_is_valid(tiny_dir, tmp_path, scenario, extra):
    result = run(short(tiny_dir, scenario, **extra), log_dir=tmp_path / "lg")
    lg = result["loadgen"]
    assert result["valid"] is True and lg["result"] == "VALID", lg["summary"]
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
        assert len(reqs) == lg["detail"]["result_query_count"] >= 64
    assert all(r.tokens == 4 for r in reqs)
    assert result["metrics"]["latency_p99"]["value"] >= result["metrics"]["latency_p50"]["value"] > 0
    if scenario == "server":
        assert result["metrics"]["goodput"]["value"] > 0  # judged by the server's targets
        assert lg["detail"]["effective_target_qps"] == pytest.approx(25.0)


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
