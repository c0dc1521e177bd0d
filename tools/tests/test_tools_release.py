"""The release tool on fake workspaces. The real seven-package isolated install is .ci/run's job."""

from __future__ import annotations

import importlib.util
import io
import tarfile
import zipfile

import pytest

from tools import release
from tools.workspace import WorkspaceError, load_workspace

CLI_OK = "import argparse\n\ndef main():\n    argparse.ArgumentParser(prog='ds-b').parse_args()\n"
CLI_BROKEN = "import sys\n\ndef main():\n    sys.exit(3)\n"
GRAPH = {
    "ds-a": {},
    "ds-b": {"deps": ["ds-a>=0.1,<0.2"], "scripts": {"ds-b": "ds_b.cli:main"}, "modules": {"cli": CLI_OK}},
    "ds-c": {"deps": ["ds-b>=0.1,<0.2"], "extras": {"x": ["ds-d>=0.1,<0.2"]}},
    "ds-d": {"version": "0.1.4"},
}


def test_plan_builds_the_closure_in_order_and_installs_only_the_targets(make_workspace):
    ws = load_workspace(make_workspace(GRAPH))
    plan = release.make_plan(ws, ["ds-c"])
    assert plan.build == ["ds-a", "ds-b", "ds-c"]  # ds-d is only an extra: installing ds-c alone skips it
    assert plan.install == ["ds-c"]
    everything = release.make_plan(ws, None)
    assert sorted(everything.install) == ["ds-a", "ds-b", "ds-c", "ds-d"]
    assert everything.build == everything.install == ws.order()


def test_tag_selects_its_package_and_must_match_the_version(make_workspace):
    ws = load_workspace(make_workspace(GRAPH))
    assert release.package_for_tag(ws, "ds-d-v0.1.4").name == "ds-d"
    with pytest.raises(WorkspaceError, match=r"ds-d: tag ds-d-v0.2.0 says 0.2.0 but the package is at 0.1.4"):
        release.package_for_tag(ws, "ds-d-v0.2.0")
    with pytest.raises(WorkspaceError, match=r"expected tag ds-d-v0.1.4 "):
        release.package_for_tag(ws, "ds-d-v0.1.04")
    with pytest.raises(WorkspaceError, match="not a '<package>-v<version>' tag"):
        release.package_for_tag(ws, "ds-zz-v1.0")


# with hatchling here, build in this environment (about 1 s a package instead of about 5)
ISOLATION = importlib.util.find_spec("hatchling") is None


@pytest.fixture
def built(make_workspace, tmp_path):
    """The fake workspace with ds-a and ds-b built into dist/."""
    root = make_workspace(GRAPH)
    ws = load_workspace(root)
    dist = tmp_path / "dist"
    dist.mkdir()
    for name in ("ds-a", "ds-b"):
        ok, why = release.build(ws.get(name), dist, isolation=ISOLATION)
        assert ok, why
    return ws, dist


def rewrite_wheel(wheel, member, edit):
    """Rewrite one member of a wheel in place (RECORD hashes go stale, which is not what we check)."""
    with zipfile.ZipFile(wheel) as zf:
        items = {name: zf.read(name) for name in zf.namelist()}
    items[member] = edit(items[member].decode()).encode()
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in items.items():
            zf.writestr(name, data)


def test_metadata_of_a_real_build_passes(built):
    ws, dist = built
    assert sorted(p.name for p in dist.iterdir()) == [
        "ds_a-0.1.0-py3-none-any.whl",
        "ds_a-0.1.0.tar.gz",
        "ds_b-0.1.0-py3-none-any.whl",
        "ds_b-0.1.0.tar.gz",
    ]
    assert release.check_metadata(ws.get("ds-a"), dist) == []
    assert release.check_metadata(ws.get("ds-b"), dist) == []


def test_metadata_check_names_the_bad_field(built):
    ws, dist = built
    wheel = dist / "ds_b-0.1.0-py3-none-any.whl"
    metadata = "ds_b-0.1.0.dist-info/METADATA"
    rewrite_wheel(wheel, metadata, lambda t: t.replace("Version: 0.1.0", "Version: 9.9.9"))
    assert release.check_metadata(ws.get("ds-b"), dist) == [f"{wheel.name}: Version: 9.9.9, expected 0.1.0"]
    rewrite_wheel(wheel, metadata, lambda t: t.replace("Requires-Dist: ds-a", "Requires-Dist: ds-a >>>"))
    problems = release.check_metadata(ws.get("ds-b"), dist)
    assert any(p.startswith(f"{wheel.name}: requires-dist: 'ds-a >>>") for p in problems), problems
    rewrite_wheel(wheel, "ds_b-0.1.0.dist-info/entry_points.txt", lambda t: t.replace("ds-b =", "ds-bee ="))
    assert (
        f"{wheel.name}: entry_points.txt: console scripts ['ds-bee'], expected ['ds-b']"
        in release.check_metadata(ws.get("ds-b"), dist)
    )

    # the long description is the README; an sdist without it is not releasable
    sdist = dist / "ds_a-0.1.0.tar.gz"
    with tarfile.open(sdist) as tf:
        members = [(m, f.read() if (f := tf.extractfile(m)) else None) for m in tf.getmembers()]
    with tarfile.open(sdist, "w:gz") as tf:
        for member, data in members:
            if member.name.endswith("README.md"):
                continue
            if member.name.endswith("PKG-INFO"):
                assert data is not None
                data = data.split(b"\n\n", 1)[0] + b"\n"  # headers only: no description body
                member.size = len(data)
            tf.addfile(member, io.BytesIO(data) if data is not None else None)
    problems = release.check_metadata(ws.get("ds-a"), dist)
    assert "ds_a-0.1.0.tar.gz: ds_a-0.1.0/README.md: missing" in problems
    assert any(p.startswith("ds_a-0.1.0.tar.gz: Description: empty") for p in problems), problems


def test_missing_artifacts_are_reported(built):
    ws, dist = built
    (dist / "ds_a-0.1.0.tar.gz").unlink()
    assert release.check_metadata(ws.get("ds-a"), dist) == [f"{dist}: no sdist ds_a-0.1.0.tar.gz"]


def test_isolated_install_of_each_package_from_the_wheelhouse(make_workspace, tmp_path):
    """End to end on a workspace with no third-party deps (so pip needs no registry: --no-index)."""
    graph = dict(GRAPH)
    graph["ds-c"] = {
        "deps": ["ds-b>=0.1,<0.2"],
        "scripts": {"ds-c": "ds_c.cli:main"},
        "modules": {"cli": CLI_BROKEN},
    }
    graph["ds-e"] = {"deps": ["ds-f>=0.1,<0.2"]}
    graph["ds-f"] = {}
    root = make_workspace(graph)
    (root / "packages/ds-f/README.md").unlink()  # project.readme names it: hatchling refuses to build
    with (root / "packages/ds-d/src/ds_d/__init__.py").open("a") as init:  # like torch without numpy
        init.write("import sys\n\nsys.stderr.write('UserWarning: Failed to initialize NumPy\\n')\n")
    ws = load_workspace(root)
    dist = tmp_path / "wheelhouse"
    plan = release.make_plan(ws, ["ds-b", "ds-c", "ds-d", "ds-e"])
    lines: list[str] = []
    results = release.release(
        ws, plan, dist, isolation=ISOLATION, constraints=[], pip_args=["--no-index"], jobs=2, log=lines.append
    )
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == ["ds-a", "ds-b", "ds-c", "ds-d", "ds-f", "ds-e"]
    assert (by_name["ds-a"].build, by_name["ds-a"].metadata, by_name["ds-a"].install) == ("ok", "ok", None)
    assert (by_name["ds-b"].install, by_name["ds-b"].scripts) == ("ok", 1)  # ds-a came along from dist/
    assert by_name["ds-d"].install == "ok"
    assert by_name["ds-c"].install == "FAIL"
    assert by_name["ds-c"].problems == ["ds-c: install: ds-c --help exited 3: no output"]
    assert "release: ds-c: install FAILED" in "\n".join(lines)
    assert by_name["ds-f"].build == "FAIL" and by_name["ds-f"].problems[0].startswith(
        "ds-f: build: python -m build exited"
    )
    assert by_name["ds-e"].problems == ["ds-e: install: not tried: its dependency ds-f failed"]
    table = release.table(results)
    assert table.splitlines()[0].split() == [
        "package", "version", "build", "metadata", "install+import", "scripts", "--help", "seconds", "result"
    ]  # fmt: skip
    assert "FAILED" in table.splitlines()[4] and table.splitlines()[3].split()[-1] == "ok"


def test_install_check_catches_extra_siblings_and_a_wrong_version(built, tmp_path):
    """A wheel that drags in a sibling it should not, and reports a version it is not, fails."""
    ws, dist = built
    ok, why = release.build(ws.get("ds-d"), dist, isolation=ISOLATION)
    assert ok, why
    wheel = dist / "ds_b-0.1.0-py3-none-any.whl"
    rewrite_wheel(
        wheel,
        "ds_b-0.1.0.dist-info/METADATA",
        lambda t: t.replace("Requires-Dist:", "Requires-Dist: ds-d\nRequires-Dist:", 1),
    )
    rewrite_wheel(wheel, "ds_b/__about__.py", lambda t: '__version__ = "0.0.7"\n')
    (tmp_path / "work").mkdir()
    problems = release.install_check(ws, ws.get("ds-b"), dist, [], tmp_path / "work", ["--no-index"])
    assert problems == [
        "installed siblings ['ds-a', 'ds-b', 'ds-d'], expected exactly its closure ['ds-a', 'ds-b']",
        "ds_b.__version__ is '0.0.7', expected 0.1.0",
    ]


def test_install_check_catches_a_sibling_from_outside_the_wheelhouse(built, tmp_path):
    ws, dist = built
    elsewhere = tmp_path / "elsewhere"  # stands in for a registry that also has a ds-a 0.1.0
    elsewhere.mkdir()
    (dist / "ds_a-0.1.0-py3-none-any.whl").rename(elsewhere / "ds_a-0.1.0-py3-none-any.whl")
    (tmp_path / "work").mkdir()
    problems = release.install_check(
        ws, ws.get("ds-b"), dist, [], tmp_path / "work", ["--no-index", "--find-links", str(elsewhere)]
    )
    assert problems == [
        f"ds-a came from {(elsewhere / 'ds_a-0.1.0-py3-none-any.whl').as_uri()}, not from a wheel in {dist}"
    ]


def test_cli_bad_input_exits_2(make_workspace, run_tool):
    root = make_workspace(GRAPH)
    done = run_tool("release", "--root", root, "--packages", "ds-nope", "--skip-install")
    assert done.returncode == 2
    assert done.stderr.startswith("release: error: ds-nope: unknown package")
    done = run_tool("release", "--root", root, "--tag", "ds-a-v0.9.0")
    assert done.returncode == 2
    assert (
        "ds-a: tag ds-a-v0.9.0 says 0.9.0 but the package is at 0.1.0: expected tag ds-a-v0.1.0"
        " (packages/ds-a/src/ds_a/__about__.py)" in done.stderr
    )
    assert not (root / "dist").exists()
