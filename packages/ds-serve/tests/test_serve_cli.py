"""`ds-serve` command line: subcommand and shorthand, YAML config plus key=value, one-line errors (exit 2)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from ds_serve.cli import main


def ds_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ds_serve", *args], capture_output=True, text=True, timeout=120
    )


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ds-serve: error: "), r.stderr
    return lines[0]


def test_missing_model_dir_is_one_line_exit_2(tmp_path):
    for args in (["--model", str(tmp_path / "nope")], ["serve", "--model", str(tmp_path / "nope")]):
        assert one_line(ds_serve(*args)) == (f"ds-serve: error: --model: {tmp_path / 'nope'}: config.yaml: "
                                             "not found; expected a ds model directory")  # fmt: skip
    assert "model.onnx: not found" in one_line(ds_serve("serve", "--onnx", str(tmp_path)))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "max_batch: expected >= 1, got 0"),
        (["--batching", "dynamic"], "invalid choice: 'dynamic'"),
        (["--max-batch", "many"], "invalid int value: 'many'"),
        (["scheduler.max_batch=many"], "overrides: scheduler.max_batch: expected int, got 'many'"),
        (["scheduler.rows=4"], "overrides: scheduler.rows: unknown setting"),
        (["max_batch"], "override 'max_batch': expected key=value"),
        (["--onnx", "x"], "--model / --onnx: expected exactly one model directory"),
        (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
        (["--dtype", "fp8"], "--dtype: expected one of fp32, bf16, fp16, got 'fp8'"),
        (["--prefill", "both"], "invalid choice: 'both'"),
        (["--step-tokens", "0"], "step_tokens: expected >= 1, got 0"),
        (["scheduler.cuda_graph=maybe"], "overrides: scheduler.cuda_graph: expected bool, got 'maybe'"),
    ],
)
def test_bad_settings_exit_2(model_dir, args, message, capsys):
    """In process (the same main() the console script runs), so that each case skips a torch start-up."""
    try:
        code = main(["serve", "--model", str(model_dir), *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert message in one_line(subprocess.CompletedProcess([], code, "", err))


def test_bad_config_file_exit_2(model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler:\n  max_batch: [1\n")
    assert one_line(ds_serve("serve", "--config", str(bad))).startswith(f"ds-serve: error: {bad}: line ")
    bad.write_text("scheduler:\n  batching: dynamic\n")
    msg = one_line(ds_serve("serve", "--model", str(model_dir), "--config", str(bad)))
    assert msg == "ds-serve: error: batching: expected continuous or fixed, got 'dynamic'"
    bad.write_text("server:\n  drain_s: soon\n")
    assert f"{bad}: server.drain_s: expected float" in one_line(ds_serve("--config", str(bad)))
    assert "no such file" in one_line(ds_serve("serve", "--config", str(tmp_path / "none.yaml")))


def test_config_flags_and_overrides_layer(model_dir, tmp_path, start_server):
    """YAML < key=value: the YAML sets the name and an API key; the override replaces the key."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model: {model_dir}\nserver:\n  model_name: from-yaml\n  api_key: yaml-key\n"
                   "scheduler:\n  max_batch: 2\n")  # fmt: skip
    server = start_server("--config", str(cfg), "server.api_key=override-key")
    assert (
        httpx.get(server.url + "/v1/models", headers={"authorization": "Bearer yaml-key"}).status_code == 401
    )
    r = httpx.get(server.url + "/v1/models", headers={"authorization": "Bearer override-key"})
    assert [m["id"] for m in r.json()["data"]] == ["from-yaml"]


def test_engine_switches_layer(tmp_path):
    """--no-cuda-graph, --prefill and --step-tokens reach SchedulerConfig; YAML and key=value too."""
    from ds_serve.cli import build_parser, settings_from_args

    def settings(*argv: str) -> dict:
        argv = ("serve", "--model", "m", *argv)
        return settings_from_args(build_parser().parse_args(argv), list(argv[1:]))

    base = settings()
    assert (base["scheduler.cuda_graph"], base["scheduler.prefill"], base["scheduler.step_tokens"]) == (
        True, "auto", 256)  # fmt: skip
    flags = settings("--no-cuda-graph", "--prefill", "separate", "--step-tokens", "64")
    assert (flags["scheduler.cuda_graph"], flags["scheduler.prefill"], flags["scheduler.step_tokens"]) == (
        False, "separate", 64)  # fmt: skip
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("scheduler:\n  cuda_graph: false\n  prefill: mixed\n")
    layered = settings("--config", str(cfg), "scheduler.cuda_graph=true")
    assert (layered["scheduler.cuda_graph"], layered["scheduler.prefill"]) == (True, "mixed")


def test_help_shows_defaults():
    r = ds_serve("serve", "--help")
    assert r.returncode == 0
    assert "--max-batch MAX_BATCH" in r.stdout and "(default: 8)" in r.stdout
    assert "scheduler.max_batch" in r.stdout
    assert "--no-cuda-graph" in r.stdout and "--step-tokens STEP_TOKENS" in r.stdout
    assert "serve" in ds_serve("--help").stdout


def _http_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (headers, then Content-Length bytes of body); b"" on EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_idle_keep_alive_connections_stay_open_for_keep_alive_s(servers, start_server):
    # An idle connection closes only after server.keep_alive_s (default 65 s: above httpx's and the
    # OpenAI SDK's own 5 s idle expiry, so the server never closes one as a client reuses it).
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for server, idle_s, still_open in (
        (start_server("--keep-alive", "0.5"), 1.0, False),
        (servers["main"], 5.5, True),  # past uvicorn's own default of 5 s
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(request)
            assert _http_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(idle_s)
            if still_open:
                sock.sendall(request)
                assert _http_response(sock).startswith(b"HTTP/1.1 200")
            else:
                sock.settimeout(1.0)  # closed by now, not at some later default
                assert sock.recv(65536) == b""
