"""The checks CI runs, run on this repository itself."""

from __future__ import annotations

from tools import check_versions, workspace
from tools.workspace import REPO_ROOT, load_workspace


def test_real_workspace_graph_and_layering(capsys):
    assert workspace.main(["check", "--root", str(REPO_ROOT)]) == 0, capsys.readouterr().err
    ws = load_workspace(REPO_ROOT)
    assert {"ds-core", "ds-models", "ds-trainer"} <= {p.name for p in ws.packages.values()}
    assert ws.order().index("ds-core") < ws.order().index("ds-models")


def test_real_sibling_ranges_admit_current_versions(capsys):
    # the changed-since-tag part runs in CI (python -m tools.check_versions); here only the ranges
    assert check_versions.main(["--root", str(REPO_ROOT), "--no-tags"]) == 0, capsys.readouterr().err
