from __future__ import annotations

import json

import pytest

from tools import workspace
from tools.workspace import WorkspaceError, load_workspace, read_layering

CHAIN = {
    "ds-a": {},
    "ds-b": {"deps": ["ds-a>=0.1,<0.2", "pyyaml>=6"]},
    "ds-c": {"deps": ["ds-b>=0.1,<0.2"], "extras": {"fast": ["ds-d>=0.1,<0.2", "numpy>=1"]}},
    "ds-d": {"version": "0.3.1", "scripts": {"ds-d": "ds_d.cli:main"}},
}
LAYERING = {"ds-a": "—", "ds-b": "ds-a", "ds-c": "ds-b (extras: ds-d, numpy)", "ds-d": "—"}


def test_load_reads_names_versions_dependencies_and_scripts(make_workspace):
    ws = load_workspace(make_workspace(CHAIN, LAYERING))
    c = ws.get("ds-c")
    assert [d.text for d in c.dependencies] == ["ds-b>=0.1,<0.2"]
    assert [d.text for d in c.optional_dependencies["fast"]] == ["ds-d>=0.1,<0.2", "numpy>=1"]
    assert str(ws.get("ds-d").version) == "0.3.1"
    assert ws.get("ds-d").scripts == {"ds-d": "ds_d.cli:main"}
    assert ws.get("DS_B").name == "ds-b"  # names are matched the way pip matches them
    assert ws.deps("ds-c") == {"ds-b", "ds-d"}
    assert ws.deps("ds-c", extras=False) == {"ds-b"}
    assert ws.deps("ds-b") == {"ds-a"}  # pyyaml is third-party, not an edge


def test_order_puts_dependencies_first(make_workspace):
    ws = load_workspace(make_workspace(CHAIN, LAYERING))
    order = ws.order()
    assert sorted(order) == ["ds-a", "ds-b", "ds-c", "ds-d"]
    for pkg in order:
        for dep in ws.deps(pkg):
            assert order.index(dep) < order.index(pkg), (dep, pkg, order)
    assert ws.order(["ds-c", "ds-a"]) == ["ds-a", "ds-c"]
    assert ws.closure(["ds-c"]) == {"ds-a", "ds-b", "ds-c"}
    assert ws.closure(["ds-c"], extras=True) == {"ds-a", "ds-b", "ds-c", "ds-d"}
    assert ws.dependents(["ds-a"]) == {"ds-a", "ds-b", "ds-c"}
    assert ws.dependents(["ds-d"]) == {"ds-d", "ds-c"}


def test_order_of_a_subset_follows_transitive_dependencies(make_workspace):
    # names chosen so that alphabetical order is the wrong answer
    ws = load_workspace(
        make_workspace(
            {"ds-z": {}, "ds-m": {"deps": ["ds-z>=0.1,<0.2"]}, "ds-a": {"deps": ["ds-m>=0.1,<0.2"]}}
        )
    )
    assert ws.order() == ["ds-z", "ds-m", "ds-a"]
    assert ws.order(["ds-a", "ds-z"]) == ["ds-z", "ds-a"]


def test_check_passes_and_graph_prints(make_workspace, capsys):
    root = make_workspace(CHAIN, LAYERING)
    assert workspace.main(["check", "--root", str(root)]) == 0
    assert "4 packages, no cycles" in capsys.readouterr().out
    assert workspace.main(["graph", "--root", str(root), "--json"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert graph["ds-c"]["dependencies"] == ["ds-b"]
    assert graph["ds-c"]["extras"] == ["ds-d"]
    assert workspace.main(["order", "--root", str(root)]) == 0
    assert capsys.readouterr().out.split() == load_workspace(root).order()


def test_cycle_is_named(make_workspace, capsys):
    root = make_workspace(
        {
            "ds-a": {"deps": ["ds-c>=0.1,<0.2"]},
            "ds-b": {"deps": ["ds-a>=0.1,<0.2"]},
            "ds-c": {"extras": {"x": ["ds-b>=0.1,<0.2"]}},
        }
    )
    assert workspace.main(["check", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "dependency cycle: ds-a -> ds-c -> ds-b -> ds-a" in err
    assert workspace.main(["order", "--root", str(root)]) == 2
    assert "dependency cycle" in capsys.readouterr().err


def test_layering_violation_names_package_and_dependency(make_workspace, capsys):
    layering = dict(LAYERING, **{"ds-b": "—"})
    root = make_workspace(CHAIN, layering)
    assert workspace.main(["check", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("workspace: error: ds-b: project.dependencies: 'ds-a>=0.1,<0.2' is not allowed")
    assert "(ds-b may depend on no sibling)" in err[0]
    assert err[0].endswith("(packages/ds-b/pyproject.toml)")


def test_extra_of_a_sibling_not_in_the_row_is_a_violation(make_workspace, capsys):
    layering = dict(LAYERING, **{"ds-c": "ds-b (extras: numpy)"})
    root = make_workspace(CHAIN, layering)
    assert workspace.main(["check", "--root", str(root)]) == 2
    assert (
        "ds-c: project.optional-dependencies.fast: 'ds-d>=0.1,<0.2' is not allowed" in capsys.readouterr().err
    )


def test_package_missing_from_the_table(make_workspace, capsys):
    layering = {k: v for k, v in LAYERING.items() if k != "ds-d"}
    layering["ds-c"] = "ds-b"
    root = make_workspace(CHAIN, layering)
    assert workspace.main(["check", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "ds-d: not in the layering table of docs/architecture.md" in err


def test_read_layering_matches_whole_names_and_ignores_third_party(tmp_path):
    doc = tmp_path / "arch.md"
    doc.write_text(
        "intro\n\n| package | may depend on | deps |\n|---|---|---|\n"
        "| ds-core | — | torch |\n| ds-core-extra | ds-core | |\n"
        "| `ds-bench` | ds-core-extra (extras: transformers, ds-core) | |\n\ntail | not a row\n"
    )
    assert read_layering(doc) == {
        "ds-core": set(),
        "ds-core-extra": {"ds-core"},
        "ds-bench": {"ds-core-extra", "ds-core"},
    }
    (tmp_path / "none.md").write_text("# no table here\n")
    with pytest.raises(WorkspaceError, match="no layering table"):
        read_layering(tmp_path / "none.md")


def test_real_architecture_table_parses():
    rows = read_layering(workspace.default_architecture(workspace.REPO_ROOT))
    assert rows["ds-models"] == {"ds-core"}
    assert rows["ds-bench"] == {"ds-models", "ds-quant"}
    assert rows["ds-trainer"] == {"ds-models", "ds-data"}


@pytest.mark.parametrize(
    ("about", "expected"),
    [
        (
            '__version__ = "zero.one"\n',
            "ds-a: src/ds_a/__about__.py: __version__: 'zero.one' is not a valid PEP 440",
        ),
        ("VERSION_IS = 1\n", "ds-a: src/ds_a/__about__.py: __version__: no `__version__"),
    ],
)
def test_bad_version_string_exits_2_with_one_line(make_workspace, run_tool, about, expected):
    root = make_workspace({"ds-a": {}})
    (root / "packages/ds-a/src/ds_a/__about__.py").write_text(about)
    done = run_tool("workspace", "check", "--root", root)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert expected in done.stderr
    assert "(packages/ds-a/src/ds_a/__about__.py)" in done.stderr


def test_bad_toml_and_bad_requirement_exit_2(make_workspace, run_tool):
    root = make_workspace({"ds-a": {}, "ds-b": {"deps": ["ds-a>=0.1,<0.2"]}})
    pyproject = root / "packages/ds-b/pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"ds-a>=0.1,<0.2"', '"ds-a >>> 0.1"'))
    done = run_tool("workspace", "graph", "--root", root)
    assert done.returncode == 2
    assert "ds-b: project.dependencies[0]: invalid requirement 'ds-a >>> 0.1'" in done.stderr
    pyproject.write_text(pyproject.read_text().replace('name = "ds-b"', 'name = "ds-b'))
    done = run_tool("workspace", "graph", "--root", root)
    assert done.returncode == 2
    assert done.stderr.startswith("workspace: error: ds-b: pyproject.toml: invalid TOML")
    assert done.stderr.count("\n") == 1


def test_help_shows_defaults(run_tool):
    done = run_tool("workspace", "check", "--help")
    assert done.returncode == 0
    assert "(default:" in done.stdout and "--architecture" in done.stdout
