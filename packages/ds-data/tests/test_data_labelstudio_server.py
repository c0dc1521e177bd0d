"""The Label Studio round trip against a real server started on loopback by this test.

The server comes from the ``labelstudio`` extra. Its dependencies pin versions that clash with the
dev environment (numpy, pyarrow), so it usually lives in its own venv: the test looks for the
``label-studio`` executable in $DS_LABEL_STUDIO, then on PATH, then in ``.venv-labelstudio/`` at the
repository root. It skips, with the reason, only when no server can be found or started.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from ds_data.labelstudio import export_tasks, import_tasks, labelling_config
from ds_data.synthetic import sample_records

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TOKEN = "ds-data-test-token-0123456789"
START_TIMEOUT_S = float(os.environ.get("DS_LABEL_STUDIO_START_TIMEOUT", "420"))

pytestmark = pytest.mark.slow


def _find_server() -> str | None:
    for cand in (
        os.environ.get("DS_LABEL_STUDIO"),
        shutil.which("label-studio"),
        os.path.join(REPO, ".venv-labelstudio", "bin", "label-studio"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, base: str):
        self.base = base

    def call(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exe = _find_server()
    if exe is None:
        pytest.skip(
            "label-studio is not installed: install the ds-data[labelstudio] extra into .venv-labelstudio "
            "(see docs/packages/ds-data.md) or set DS_LABEL_STUDIO to the executable"
        )
    data_dir = tmp_path_factory.mktemp("label-studio")
    port = _free_port()
    env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), DJANGO_DEBUG="false")
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 -- open for the server's whole life
    proc = subprocess.Popen(
        [
            exe,
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "-p",
            str(port),
            "--data-dir",
            str(data_dir),
            "--username",
            "ds@example.org",
            "--password",
            "ds-data-test-pw",
            "--user-token",
            TOKEN,
            "--enable-legacy-api-token",
            "--skip-long-migrations",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                tail = (data_dir / "server.log").read_text(errors="replace")[-400:]
                pytest.skip(f"label-studio exited with {proc.returncode} while starting: {tail}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.skip(f"label-studio did not answer /health within {START_TIMEOUT_S:.0f} s")
            time.sleep(1)
        print(f"label-studio up in {time.monotonic() - t0:.1f} s")
        yield Client(base)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its reloader child
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


AWKWARD = [
    {
        "id": "emoji_crlf",
        "domain": "retail",
        "text": "😀 Ann\r\nbought 👍🏽 a 🇺🇸 flag",
        "labels": ["purchase", "emoji"],
        "annotations": {
            "entity_recognition": [
                {"id": "e1", "start": 2, "end": 5, "label": "PERSON", "text": "Ann"},
                {"id": "e2", "start": 14, "end": 16, "label": "EMOJI", "text": "👍🏽"},
                {"id": "e3", "start": 19, "end": 21, "label": "FLAG", "text": "🇺🇸"},
            ],
            "relation_extraction": [{"id": "r1", "head": "e1", "tail": "e3", "label": "bought"}],
        },
    },
    {
        "id": "cjk_rtl",
        "domain": "government",
        "text": "東京都庁 وزارة المالية ministry",
        "annotations": {
            "entity_recognition": [
                {"id": "t", "start": 0, "end": 4, "label": "ORGANIZATION", "text": "東京都庁"},
                {"id": "m", "start": 5, "end": 18, "label": "ORGANIZATION", "text": "وزارة المالية"},
            ],
            "relation_extraction": [{"head": "t", "tail": "m", "label": "related"}],
        },
    },
    {"id": "no_annotations", "domain": "energy", "text": "Nothing to label here."},
]


def test_round_trip_through_a_real_label_studio(server):
    records = list(sample_records(24, seed=5)) + AWKWARD
    tasks = export_tasks(records)
    project = server.call(
        "POST", "/api/projects", {"title": "ds-data round trip", "label_config": labelling_config(records)}
    )
    pid = project["id"]
    # 1. import the tasks (data only), as a labelling team would start
    imported = server.call("POST", f"/api/projects/{pid}/import", [t["data"] for t in tasks])
    assert imported["task_count"] == len(records)
    listed = server.call("GET", f"/api/tasks?project={pid}&page_size=1000")["tasks"]
    by_ds_id = {t["data"]["ds_id"]: t["id"] for t in listed}
    assert set(by_ds_id) == {r["id"] for r in records}
    # 2. create one annotation per task through the API
    for t in tasks:
        ann = server.call(
            "POST",
            f"/api/tasks/{by_ds_id[t['data']['ds_id']]}/annotations/",
            {"result": t["annotations"][0]["result"]},
        )
        assert ann["id"] > 0
    # 3. read everything back as Label Studio's own JSON export and convert to ds records
    exported = server.call("GET", f"/api/projects/{pid}/export?exportType=JSON")
    assert len(exported) == len(records)
    assert all(len(t["annotations"]) == 1 for t in exported)
    back = import_tasks(exported)
    assert sorted(back, key=lambda r: r["id"]) == sorted(records, key=lambda r: r["id"])


def test_annotation_edited_on_the_server_is_what_comes_back(server):
    record = AWKWARD[0]
    (task,) = export_tasks([record])
    pid = server.call(
        "POST", "/api/projects", {"title": "ds-data edit", "label_config": labelling_config([record])}
    )["id"]
    server.call("POST", f"/api/projects/{pid}/import", [task["data"]])
    (t,) = server.call("GET", f"/api/tasks?project={pid}")["tasks"]
    first = server.call(
        "POST", f"/api/tasks/{t['id']}/annotations/", {"result": task["annotations"][0]["result"]}
    )
    # An annotator relabels the flag span and drops the relation; Label Studio offsets are UTF-16.
    result = [r for r in task["annotations"][0]["result"] if r["type"] != "relation"]
    for r in result:
        if r.get("id") == "e3":
            r["value"]["labels"] = ["COUNTRY"]
    server.call("PATCH", f"/api/annotations/{first['id']}/", {"result": result})
    (exported,) = server.call("GET", f"/api/projects/{pid}/export?exportType=JSON")
    (rec,) = import_tasks([exported])
    ents = rec["annotations"]["entity_recognition"]
    assert [e["label"] for e in ents] == ["PERSON", "EMOJI", "COUNTRY"]
    assert [e["text"] for e in ents] == ["Ann", "👍🏽", "🇺🇸"]
    assert rec["annotations"]["relation_extraction"] == []
