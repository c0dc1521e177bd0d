"""`ds-bench` end to end: run writes a result, compare / export-optimum read it, bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ds_bench.cli import main
from ds_bench.metrics import METRICS, Counters, compute
from ds_bench.result import FORMAT_VERSION, load_result, records

pytest.importorskip("mlperf_loadgen")
SHORT = ["--samples", "8", "--prompt-len", "16", "--gen-tokens", "4", "--min-duration", "0.3",
         "--eval-tokens", "256", "--eval-seq-len", "64", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def results(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    a, b = out / "bs2.json", out / "bs4.json"
    assert (
        main(
            [
                "run",
                "--model",
                str(tiny_dir),
                "--scenario",
                "offline",
                "--batch-size",
                "2",
                "--out",
                str(a),
                *SHORT,
            ]
        )
        == 0
    )
    assert main(["run", "--model", str(tiny_dir), "--scenario", "offline", "--batch-size", "4", "--out", str(b),
                 "--reference", str(a), *SHORT]) == 0  # fmt: skip
    return a, b


def test_run_writes_a_complete_result(results, tiny_dir):
    a, _ = results
    r = json.loads(a.read_text())
    assert r["format"] == "ds-bench-result" and r["format_version"] == FORMAT_VERSION
    assert r["device"]["type"] == "cpu" and r["device"]["name"]
    assert {"ds-bench", "ds-models", "torch", "mlcommons-loadgen", "python"} <= set(r["versions"])
    assert r["seed"] == 0 and r["valid"] is True and r["loadgen"]["result"] == "VALID"
    assert r["backend"]["threads"] == __import__("torch").get_num_threads()  # what the run used
    assert set(r["metrics"]) == set(METRICS)
    for name, entry in r["metrics"].items():
        assert entry["unit"] == METRICS[name].unit
        assert entry["value"] is not None or entry["unavailable"], name
    assert r["metrics"]["energy_per_sample"]["value"] is None or r["energy"]["meter"].startswith(
        ("RAPL", "NVML")
    )
    assert r["model"]["dir"] == str(tiny_dir) and r["model"]["params"] > 0
    assert (a.parent / "bs2.json.loadgen" / "mlperf_log_detail.txt").exists()


def test_stored_requests_reproduce_the_stored_metrics(results):
    r = load_result(results[0])
    again = compute(records(r), Counters())
    for name in (
        "latency_p50",
        "latency_p90",
        "latency_p99",
        "ttft",
        "tpot",
        "itl_p99",
        "samples_per_s",
        "tokens_per_s",
    ):
        assert again[name] == pytest.approx(r["metrics"][name]["value"], rel=1e-4), name


def test_reference_gives_accuracy_delta(results):
    a, b = (load_result(p) for p in results)
    assert b["metrics"]["accuracy_delta"]["value"] == pytest.approx(
        b["metrics"]["accuracy"]["value"] - a["metrics"]["accuracy"]["value"]
    )


def test_compare_prints_the_table_and_writes_charts(results, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    md = tmp_path / "table.md"
    assert (
        main(["compare", *map(str, results), "--charts", str(tmp_path / "charts"), "--markdown", str(md)])
        == 0
    )
    table = capsys.readouterr().out
    assert table.strip() == md.read_text().strip()
    lines = table.splitlines()
    assert lines[0].startswith("| metric | unit |") and len(lines[0].split("|")) == 2 + 2 + 2
    for name in METRICS:
        assert any(line.startswith(f"| {name} |") for line in lines), name
    assert "| LoadGen |  | VALID | VALID |" in table
    for png in ("latency_distribution.png", "throughput_vs_batch.png", "accuracy_vs_size.png"):
        data = (tmp_path / "charts" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_compare_rows_layout_has_one_row_per_result(results, capsys):
    assert main(["compare", *map(str, results), "--layout", "rows"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:6] == ["model", "backend", "precision", "scenario", "bs", "LoadGen"] and len(lines) == 2 + 2
    for line, path in zip(lines[2:], results):
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        r = load_result(path)
        assert (cells["bs"], cells["LoadGen"]) == (str(r["settings"]["batch_size"]), "VALID")
        tps = r["metrics"]["tokens_per_s"]["value"]
        assert float(cells["tok/s"]) == pytest.approx(tps, rel=1e-2)
        host = r["metrics"]["peak_memory"]["value"]["host"]
        assert float(cells["host MiB"]) == pytest.approx(host, rel=1e-2)
        assert cells["dev MiB"] == "n/a" and cells["J/sample"] == "n/a"  # CPU: no device, no counter


def test_export_optimum_report(results, tmp_path):
    out = tmp_path / "benchmark_report.json"
    assert main(["export-optimum", str(results[0]), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"load_model", "prefill", "decode", "per_token"}
    for target in report.values():
        assert set(target) == {"memory", "latency", "throughput", "energy", "efficiency"}
    r = load_result(results[0])
    ttfts = [q.ttft for q in records(r)]
    assert report["prefill"]["latency"]["values"] == pytest.approx(ttfts)
    assert (
        report["prefill"]["latency"]["unit"] == "s" and report["prefill"]["throughput"]["unit"] == "tokens/s"
    )
    assert report["load_model"]["latency"]["values"] == [pytest.approx(r["metrics"]["load_time"]["value"])]
    assert report["decode"]["memory"]["max_ram"] == pytest.approx(
        r["metrics"]["peak_memory"]["value"]["host"] * 2**20 / 1e6
    )
    assert report["decode"]["energy"] is None  # not measured here: null, never 0


def test_config_file_flags_and_overrides_in_order(tiny_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "scenario: singlestream\ngen_tokens: 3\nsamples: 8\nprompt_len: 8\nmin_duration: 0.2\neval_tokens: 64\n"
    )
    out = tmp_path / "r.json"
    argv = ["run", "--config", str(cfg), "--model", str(tiny_dir), "--gen-tokens", "5", "--out", str(out), "--quiet",
            "gen_tokens=2", "label=from-cli"]  # fmt: skip
    assert main(argv) == 0
    r = load_result(out)
    s = r["settings"]
    assert (s["scenario"], s["samples"], s["gen_tokens"], r["label"]) == ("singlestream", 8, 2, "from-cli")
    assert all(q.tokens == 2 for q in records(r))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--model", "{tiny}", "--backend", "tensorrt"], "--backend: unknown 'tensorrt'"),
        (["run", "--model", "{tiny}", "--scenario", "multistream"], "--scenario: unknown 'multistream'"),
        (["run", "--model", "{tmp}/nope"], "--model: {tmp}/nope: not a directory"),
        (["run", "--model", "{tmp}/empty"], "cannot load"),
        (["run", "--model", "{tiny}", "--backend", "onnx"], "no model.onnx"),
        (["run", "--model", "{tiny}", "batch_size=zero"], "batch-size"),
        (["run", "--model", "{tiny}", "colour=blue"], "colour: unknown setting"),
        (["compare", "{tmp}/old.json"], "{tmp}/old.json: format_version: 0 is older than this ds-bench's 1"),
        (["compare", "{tmp}/junk.json"], "{tmp}/junk.json: line 1: not valid JSON"),
        (["compare", "{tmp}/other.json"], "format: not a ds-bench result"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tiny_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "old.json").write_text(json.dumps({"format": "ds-bench-result", "format_version": 0}))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    argv = [a.format(tiny=tiny_dir, tmp=tmp_path) for a in argv]
    assert main([*argv, "--quiet"] if argv[0] == "run" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ds-bench: error: ") and "\n" not in err
    assert message.format(tmp=tmp_path) in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present here")
def test_cuda_device_without_a_gpu_is_bad_input(tiny_dir, capsys):
    assert main(["run", "--model", str(tiny_dir), "--device", "cuda:0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ds-bench: error: --device: cuda:0: no such CUDA device here (0 visible)"


def test_entry_point_bad_input_has_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "ds_bench", "run", "--model", str(tmp_path), "--scenario", "bogus"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2
    assert (
        p.stderr.strip()
        == "ds-bench: error: --scenario: unknown 'bogus'; expected one of singlestream, server, offline"
    )


def test_metrics_command_lists_18(capsys):
    assert main(["metrics"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 18
