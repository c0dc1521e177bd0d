"""Fixtures for the tools tests: small fake workspaces on disk, optionally inside a git repository."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# pytest runs with --import-mode=importlib, which does not put the rootdir on sys.path; the tools
# are a plain top-level package of the repository, not an installed distribution.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def write_package(
    root: Path,
    name: str,
    version: str = "0.1.0",
    deps: list[str] | None = None,
    extras: dict[str, list[str]] | None = None,
    scripts: dict[str, str] | None = None,
    modules: dict[str, str] | None = None,
) -> Path:
    """A package laid out like the real ones: hatchling, version in src/<mod>/__about__.py."""
    mod = name.replace("-", "_")
    directory = root / "packages" / name
    src = directory / "src" / mod
    src.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling>=1.26"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{name}"',
        'dynamic = ["version"]',
        f'description = "The {name} test package."',
        'readme = "README.md"',
        'requires-python = ">=3.10"',
        f"dependencies = {_toml_list(deps or [])}",
        "",
    ]
    if extras:
        lines += (
            ["[project.optional-dependencies]"] + [f"{k} = {_toml_list(v)}" for k, v in extras.items()] + [""]
        )
    if scripts:
        lines += ["[project.scripts]"] + [f'{k} = "{v}"' for k, v in scripts.items()] + [""]
    lines += [
        "[tool.hatch.version]",
        f'path = "src/{mod}/__about__.py"',
        "",
        "[tool.hatch.build.targets.wheel]",
        f'packages = ["src/{mod}"]',
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (src / "__about__.py").write_text(f'__version__ = "{version}"\n')
    (src / "__init__.py").write_text("from .__about__ import __version__\n\n__all__ = ['__version__']\n")
    (src / "py.typed").write_text("")
    for module, body in (modules or {}).items():
        (src / f"{module}.py").write_text(body)
    (directory / "README.md").write_text(f"# {name}\n\nA test package.\n")
    (directory / "CHANGELOG.md").write_text(f"# Changelog — {name}\n\n## {version}\n\n- First release.\n")
    return directory


def write_architecture(root: Path, rows: dict[str, str]) -> Path:
    """docs/architecture.md with a layering table: package -> 'may depend on' cell."""
    table = [
        "| package | may depend on (declared as version ranges) | third-party core deps |",
        "|---|---|---|",
    ]
    table += [f"| {name} | {cell} | |" for name, cell in rows.items()]
    path = root / "docs" / "architecture.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Architecture\n\nLayering:\n\n" + "\n".join(table) + "\n\nAfter the table.\n")
    return path


def run_git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture
def make_workspace(tmp_path: Path) -> Callable[..., Path]:
    """make_workspace({name: {version, deps, extras, scripts}}, layering={name: cell}, git=True).

    Without ``layering`` every package may depend on every other one. With ``git`` the workspace
    is committed on branch main.
    """

    def make(
        packages: dict[str, dict[str, Any]], layering: dict[str, str] | None = None, git: bool = False
    ) -> Path:
        root = tmp_path / "ws"
        root.mkdir(exist_ok=True)
        (root / "pyproject.toml").write_text("[tool.ruff]\nline-length = 110\n")
        for name, spec in packages.items():
            write_package(root, name, **spec)
        if layering is None:
            layering = {name: ", ".join(n for n in packages if n != name) or "—" for name in packages}
        write_architecture(root, layering)
        if git:
            run_git(root, "init", "-q", "-b", "main")
            run_git(root, "config", "user.email", "tests@ds.invalid")
            run_git(root, "config", "user.name", "ds tests")
            run_git(root, "config", "commit.gpgsign", "false")
            commit(root, "initial")
        return root

    return make


def commit(root: Path, message: str) -> None:
    run_git(root, "add", "-A")
    run_git(root, "commit", "-q", "-m", message)


@pytest.fixture
def git_commit() -> Callable[[Path, str], None]:
    return commit


@pytest.fixture
def git() -> Callable[..., str]:
    return run_git


@pytest.fixture
def package_writer() -> Callable[..., Path]:
    return write_package


@pytest.fixture
def run_tool() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m tools.<name> args...`` as a user would, from the repository root."""

    def run(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", f"tools.{name}", *map(str, args)]
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=300)

    return run
