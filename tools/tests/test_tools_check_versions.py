from __future__ import annotations

import pytest

from tools import bump, check_versions

PAIR = {"ds-a": {}, "ds-b": {"deps": ["ds-a>=0.1,<0.2"], "extras": {"x": ["ds-a>=0.1,<0.2"]}}}


def set_version(root, name, version):
    mod = name.replace("-", "_")
    (root / f"packages/{name}/src/{mod}/__about__.py").write_text(f'__version__ = "{version}"\n')


def set_deps(root, name, text):
    pyproject = root / f"packages/{name}/pyproject.toml"
    lines = [
        f"dependencies = {text}" if line.startswith("dependencies =") else line
        for line in pyproject.read_text().splitlines()
    ]
    pyproject.write_text("\n".join(lines) + "\n")


def test_consistent_workspace_passes(make_workspace, capsys):
    root = make_workspace(PAIR)
    assert check_versions.main(["--root", str(root), "--no-tags"]) == 0
    assert "2 sibling ranges admit ds-a 0.1.0, ds-b 0.1.0" in capsys.readouterr().out


def test_range_excluding_the_sibling_fails_with_the_clear_line(make_workspace, run_tool):
    root = make_workspace(PAIR)
    set_version(root, "ds-a", "0.2.0")
    done = run_tool("check_versions", "--root", root, "--no-tags")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "check_versions: error: ds-b: dependency 'ds-a>=0.1,<0.2' excludes ds-a 0.2.0 (packages/ds-b/pyproject.toml)",
        "check_versions: error: ds-b: optional dependency [x] 'ds-a>=0.1,<0.2' excludes ds-a 0.2.0"
        " (packages/ds-b/pyproject.toml)",
    ]


@pytest.mark.parametrize("spec", ['["ds-a==0.1.0"]', '["ds-a===0.1.0"]', '["ds-a>=0.1,==0.1.0"]'])
def test_pins_between_siblings_are_rejected(make_workspace, capsys, spec):
    root = make_workspace(PAIR)
    set_deps(root, "ds-b", spec)
    assert check_versions.main(["--root", str(root), "--no-tags"]) == 2
    err = capsys.readouterr().err
    assert "ds-b: dependency 'ds-a" in err and "pins ds-a with '==" in err
    assert "e.g. 'ds-a>=0.1,<0.2'" in err


def test_unbounded_sibling_range_is_rejected_and_bounded_forms_accepted(make_workspace, capsys):
    root = make_workspace(PAIR)
    set_deps(root, "ds-b", '["ds-a>=0.1"]')
    assert check_versions.main(["--root", str(root), "--no-tags"]) == 2
    assert "ds-b: dependency 'ds-a>=0.1' has no upper bound on ds-a" in capsys.readouterr().err
    for bounded in ('["ds-a~=0.1.0"]', '["ds-a==0.1.*"]', '["ds-a>=0.1,<=0.1.9"]'):
        set_deps(root, "ds-b", bounded)
        assert check_versions.main(["--root", str(root), "--no-tags"]) == 0, bounded


def test_invalid_version_exits_2(make_workspace, run_tool):
    root = make_workspace(PAIR)
    set_version(root, "ds-a", "0.1.0-final-final")
    done = run_tool("check_versions", "--root", root, "--no-tags")
    assert done.returncode == 2
    assert (
        "ds-a: src/ds_a/__about__.py: __version__: '0.1.0-final-final' is not a valid PEP 440 version"
        in done.stderr
    )


def test_change_since_tag_needs_bump_and_changelog(make_workspace, git, git_commit, capsys):
    root = make_workspace(PAIR, git=True)
    git(root, "tag", "ds-a-v0.1.0")
    git(root, "tag", "ds-b-v0.1.0")
    assert check_versions.main(["--root", str(root)]) == 0
    capsys.readouterr()

    # an edit, even uncommitted and untracked, is a change
    (root / "packages/ds-a/src/ds_a/sparse.py").write_text("X = 1\n")
    assert check_versions.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert (
        "ds-a: changed since ds-a-v0.1.0 (packages/ds-a/src/ds_a/sparse.py) but its version is 0.1.0" in err
    )
    assert "ds-b" not in err  # ds-b did not change

    git_commit(root, "add sparse")
    set_version(root, "ds-a", "0.1.1")  # bumped, but no CHANGELOG heading
    assert check_versions.main(["--root", str(root)]) == 2
    assert (
        "ds-a: version 0.1.1 has no CHANGELOG.md heading '## 0.1.1' (packages/ds-a/CHANGELOG.md)"
        in capsys.readouterr().err
    )

    set_version(root, "ds-a", "0.1.0")
    assert bump.main(["--root", str(root), "ds-a", "patch", "--note", "Add sparse."]) == 0
    assert check_versions.main(["--root", str(root)]) == 0
    assert "## 0.1.1\n\n- Add sparse.\n\n## 0.1.0" in (root / "packages/ds-a/CHANGELOG.md").read_text()


def test_latest_tag_counts_and_other_packages_tags_are_ignored(
    make_workspace, git, git_commit, package_writer, capsys
):
    root = make_workspace(PAIR, git=True)
    git(root, "tag", "ds-a-v0.0.9")
    set_version(root, "ds-a", "0.1.0")
    (root / "packages/ds-a/notes.txt").write_text("changed after 0.0.9\n")
    git_commit(root, "release 0.1.0")
    git(root, "tag", "ds-a-v0.1.0")
    git(root, "tag", "ds-a-extra-v5.0.0")  # a tag of some ds-a-extra package, not a ds-a version
    assert check_versions.main(["--root", str(root)]) == 0
    set_version(root, "ds-a", "0.0.10")  # lower than the release: not a bump
    assert check_versions.main(["--root", str(root)]) == 2
    assert "bump it past 0.1.0" in capsys.readouterr().err
