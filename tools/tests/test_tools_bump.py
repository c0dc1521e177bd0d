from __future__ import annotations

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tools import bump, check_versions
from tools.workspace import Dep, load_workspace

GRAPH = {
    "ds-a": {},
    "ds-b": {"deps": ["ds-a>=0.1,<0.2"], "extras": {"all": ["ds-a>=0.1,<0.2", "numpy>=1"]}},
    "ds-c": {"deps": ["ds-b>=0.1,<=0.1.0"]},  # deliberately tight, so a patch of ds-b breaks it
    "ds-d": {"deps": ["ds-a>=0.1,<0.3"]},  # already admits 0.2
}


def about(root, name):
    return (root / f"packages/{name}/src/{name.replace('-', '_')}/__about__.py").read_text()


@pytest.mark.parametrize(
    ("part", "expected"),
    [("patch", "0.1.1"), ("minor", "0.2.0"), ("major", "1.0.0"), ("0.1.0rc1.post2", None)],
)
def test_next_version(make_workspace, part, expected):
    pkg = load_workspace(make_workspace({"ds-a": {"version": "0.1.0"}})).get("ds-a")
    if expected is None:
        with pytest.raises(ValueError, match=r"ds-a: version: 0.1.0rc1.post2 is not above the current 0.1.0"):
            bump.next_version(pkg, part)
    else:
        assert bump.next_version(pkg, part) == Version(expected)


def test_bump_writes_version_and_changelog_heading_on_top(make_workspace, capsys):
    root = make_workspace({"ds-a": {}})
    assert bump.main(["--root", str(root), "ds-a", "minor", "--note", "Faster kernels."]) == 0
    assert about(root, "ds-a") == '__version__ = "0.2.0"\n'
    changelog = (root / "packages/ds-a/CHANGELOG.md").read_text()
    assert (
        changelog == "# Changelog — ds-a\n\n## 0.2.0\n\n- Faster kernels.\n\n## 0.1.0\n\n- First release.\n"
    )
    assert capsys.readouterr().out.strip() == "ds-a: 0.1.0 -> 0.2.0"


def test_without_cascade_the_broken_ranges_are_listed_and_check_versions_fails(make_workspace, capsys):
    root = make_workspace(GRAPH)
    assert bump.main(["--root", str(root), "ds-a", "minor"]) == 0
    out = capsys.readouterr().out
    assert "ds-b: dependency 'ds-a>=0.1,<0.2' excludes ds-a 0.2.0 (packages/ds-b/pyproject.toml)" in out
    assert check_versions.main(["--root", str(root), "--no-tags"]) == 2
    err = capsys.readouterr().err
    assert "ds-b: dependency 'ds-a>=0.1,<0.2' excludes ds-a 0.2.0 (packages/ds-b/pyproject.toml)" in err
    assert "ds-d" not in err


def test_cascade_widens_ranges_transitively_and_check_versions_passes(make_workspace, capsys):
    root = make_workspace(GRAPH)
    before_d = (root / "packages/ds-d/pyproject.toml").read_text()
    assert bump.main(["--root", str(root), "ds-a", "minor", "--cascade"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "ds-a: 0.1.0 -> 0.2.0",
        "ds-b: 'ds-a>=0.1,<0.2' -> 'ds-a>=0.1,<0.3'",
        "ds-b: 0.1.0 -> 0.1.1",
        "ds-c: 'ds-b>=0.1,<=0.1.0' -> 'ds-b>=0.1,<0.2'",
        "ds-c: 0.1.0 -> 0.1.1",
    ]
    b = (root / "packages/ds-b/pyproject.toml").read_text()
    assert 'dependencies = ["ds-a>=0.1,<0.3"]' in b and 'all = ["ds-a>=0.1,<0.3", "numpy>=1"]' in b
    assert about(root, "ds-b") == '__version__ = "0.1.1"\n'
    assert (
        "## 0.1.1\n\n- Admit ds-a 0.2.0: requires 'ds-a>=0.1,<0.3'.\n"
        in (root / "packages/ds-b/CHANGELOG.md").read_text()
    )
    assert (root / "packages/ds-d/pyproject.toml").read_text() == before_d  # its range already admitted 0.2.0
    assert about(root, "ds-d") == '__version__ = "0.1.0"\n'
    assert check_versions.main(["--root", str(root), "--no-tags"]) == 0


def test_dry_run_writes_nothing(make_workspace, capsys):
    root = make_workspace(GRAPH)
    files = sorted(root.rglob("*"))
    before = {p: p.read_bytes() for p in files if p.is_file()}
    assert bump.main(["--root", str(root), "ds-a", "major", "--cascade", "--dry-run"]) == 0
    assert "ds-b: 'ds-a>=0.1,<0.2' -> 'ds-a>=0.1,<2'" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in files if p.is_file()} == before


def test_widened_keeps_name_extras_lower_bound_and_marker():
    text = 'ds-a[fast]>=0.1.2,!=0.1.5,<0.2; python_version >= "3.10"'
    dep = Dep("project.dependencies", text, Requirement(text))
    assert bump.widened(dep, Version("0.2.0")) == 'ds-a[fast]>=0.1.2,!=0.1.5,<0.3; python_version >= "3.10"'
    compat = Dep("project.dependencies", "ds-a~=1.4", Requirement("ds-a~=1.4"))
    assert bump.widened(compat, Version("2.0.0")) == "ds-a>=1.4,<3"


@pytest.mark.parametrize(("argv", "expected"), [
    (["ds-a", "1.2.3.4.five"], "bump: error: ds-a: version: '1.2.3.4.five' is neither major/minor/patch nor a valid PEP 440 version"),
    (["ds-a", "0.0.9"], "bump: error: ds-a: version: 0.0.9 is not above the current 0.1.0"),
    (["ds-q", "patch"], "bump: error: ds-q: unknown package"),
])  # fmt: skip
def test_bad_input_exits_2(make_workspace, run_tool, argv, expected):
    root = make_workspace({"ds-a": {}})
    done = run_tool("bump", "--root", root, *argv)
    assert done.returncode == 2
    assert done.stderr.startswith(expected) and done.stderr.count("\n") == 1
    assert about(root, "ds-a") == '__version__ = "0.1.0"\n'
