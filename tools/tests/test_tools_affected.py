from __future__ import annotations

import json

import pytest

from tools import affected

# ds-a <- ds-b <- ds-c, ds-a <-(extra)- ds-e, ds-d alone
GRAPH = {
    "ds-a": {},
    "ds-b": {"deps": ["ds-a>=0.1,<0.2"]},
    "ds-c": {"deps": ["ds-b>=0.1,<0.2"]},
    "ds-d": {},
    "ds-e": {"extras": {"a": ["ds-a>=0.1,<0.2"]}},
}


def matrix(capsys, *argv):
    code = affected.main(list(argv))
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)["package"]


def test_changed_package_plus_transitive_reverse_dependents(make_workspace, capsys):
    root = str(make_workspace(GRAPH))
    assert matrix(capsys, "--root", root, "--files", "packages/ds-b/src/ds_b/x.py") == ["ds-b", "ds-c"]
    # extras are edges too, and the output is in topological order
    assert matrix(capsys, "--root", root, "--files", "packages/ds-a/README.md") == [
        "ds-a",
        "ds-b",
        "ds-c",
        "ds-e",
    ]
    assert matrix(capsys, "--root", root, "--files", "packages/ds-d/tests/t.py", "docs/index.md") == ["ds-d"]
    assert matrix(capsys, "--root", root, "--packages", "ds-c") == ["ds-c"]


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "hatch.toml", "tools/release.py", ".github/workflows/ci.yml", ".ci/run"]
)
def test_workspace_files_affect_everything(make_workspace, capsys, path):
    root = str(make_workspace(GRAPH))
    assert matrix(capsys, "--root", root, "--files", "packages/ds-d/x.py", path) == [
        "ds-a",
        "ds-b",
        "ds-c",
        "ds-d",
        "ds-e",
    ]


def test_docs_only_change_affects_nothing_and_list_format(make_workspace, capsys):
    root = str(make_workspace(GRAPH))
    assert matrix(capsys, "--root", root, "--files", "docs/index.md", "README.md") == []
    assert affected.main(["--root", root, "--files", "packages/ds-b/x.py", "--format", "list", "--why"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["ds-b", "ds-c"]
    assert "ds-b: changed: packages/ds-b/x.py" in err and "ds-c: depends on ds-b" in err


def test_diff_against_a_base_ref(make_workspace, git, git_commit, capsys):
    root = make_workspace(GRAPH, git=True)
    git(root, "checkout", "-q", "-b", "feature")
    (root / "packages/ds-b/src/ds_b/new.py").write_text("Y = 2\n")
    git_commit(root, "feature work")
    # main moves on after the branch point; its changes are not the branch's
    git(root, "checkout", "-q", "main")
    (root / "packages/ds-d/src/ds_d/other.py").write_text("Z = 3\n")
    git_commit(root, "main work")
    git(root, "checkout", "-q", "feature")
    assert matrix(capsys, "--root", str(root), "--base", "main") == ["ds-b", "ds-c"]
    # an uncommitted, untracked file counts too
    (root / "packages/ds-e/wip.py").write_text("")
    assert matrix(capsys, "--root", str(root), "--base", "main") == ["ds-b", "ds-c", "ds-e"]


def test_unknown_package_exits_2(make_workspace, run_tool):
    root = make_workspace(GRAPH)
    done = run_tool("affected", "--root", root, "--packages", "ds-b", "ds-zzz")
    assert done.returncode == 2
    assert done.stderr.startswith("affected: error: ds-zzz: unknown package (the workspace has: ds-a, ds-b")
    assert done.stderr.count("\n") == 1
    done = run_tool("affected", "--root", root, "--files", "packages/ds-gone/src/x.py")
    assert done.returncode == 2
    assert "ds-gone: unknown package in the diff (packages/ds-gone/src/x.py)" in done.stderr


def test_bad_base_ref_exits_2(make_workspace, run_tool):
    root = make_workspace(GRAPH, git=True)
    done = run_tool("affected", "--root", root, "--base", "origin/nowhere")
    assert done.returncode == 2
    assert done.stderr.startswith("affected: error: git merge-base origin/nowhere HEAD:")
    assert "Traceback" not in done.stderr
