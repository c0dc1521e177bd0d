"""A real Prometheus server (system package) scrapes ds-serve; the series is read back via its query API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

PROMETHEUS = shutil.which("prometheus")
DOCS = Path(__file__).resolve().parents[3] / "docs" / "ds-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)"
)
def test_prometheus_scrapes_ds_serve(servers, tmp_path):
    server = servers["main"]
    httpx.post(
        server.url + "/v1/completions", json={"model": "ds-tiny-test", "prompt": "fox", "max_tokens": 3}
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: ds-serve\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        query = 'ds_serve_requests_total{job="ds-serve",endpoint="completions",status="200"}'
        result, deadline = [], time.monotonic() + 60
        while not result and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
            except httpx.TransportError:
                continue
            if r.status_code == 200:
                result = r.json()["data"]["result"]
        assert result, "Prometheus never returned the ds-serve series"
        assert float(result[0]["value"][1]) >= 1
        assert result[0]["metric"]["instance"] == f"127.0.0.1:{server.port}"
        # Every query of the shipped Grafana dashboard is valid PromQL for this server's series.
        dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$job", "ds-serve").replace("$instance", ".*")
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=5)
                assert r.status_code == 200 and r.json()["status"] == "success", (panel["title"], r.text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
