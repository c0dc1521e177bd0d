"""The workspace model: packages under packages/*, their sibling graph and the layering check.

Every other tool starts from :func:`load_workspace`. A package is read from its
``pyproject.toml`` (name, dependencies, optional dependencies, console scripts) and its version
from the file named by ``[tool.hatch.version] path`` -- the same place hatchling reads it from, so
the tools and the built wheel can never disagree.

    python -m tools.workspace graph     # who depends on whom (core deps and extras)
    python -m tools.workspace order     # topological order, dependencies first
    python -m tools.workspace check     # parse everything, no cycles, layering as in the architecture

Bad input (unparsable TOML, a bad version string, a cycle, a dependency the layering table does not
allow) exits 2 with one line per problem: ``<package>: <field>: <what> (<file>)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parents[1]
# hatchling's default version pattern (hatchling/version/source/regex.py), so we read what it reads.
VERSION_PATTERN = re.compile(r"""^(__version__|VERSION) *= *(['"])v?(?P<version>.+?)\2""", re.MULTILINE)


class WorkspaceError(ValueError):
    """Bad workspace input; the message names the package, the field and the file."""


@dataclass(frozen=True)
class Dep:
    """One declared requirement: where it was declared, its text as written, and its parse."""

    where: str  # "project.dependencies" or "project.optional-dependencies.<extra>"
    text: str
    req: Requirement

    @property
    def extra(self) -> str | None:
        return (
            self.where.rsplit(".", 1)[1] if self.where.startswith("project.optional-dependencies.") else None
        )


@dataclass(frozen=True)
class Package:
    name: str
    version: Version
    directory: Path
    pyproject: Path
    version_file: Path
    import_name: str
    dependencies: tuple[Dep, ...]
    optional_dependencies: dict[str, tuple[Dep, ...]]
    scripts: dict[str, str]

    def requirements(self, extras: bool = True) -> list[Dep]:
        found = list(self.dependencies)
        if extras:
            for deps in self.optional_dependencies.values():
                found += deps
        return found


@dataclass
class Workspace:
    root: Path
    packages: dict[str, Package] = field(default_factory=dict)  # canonical name -> package

    def rel(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def get(self, name: str) -> Package:
        try:
            return self.packages[canonicalize_name(name)]
        except KeyError:
            known = ", ".join(p.name for p in self.packages.values())
            raise WorkspaceError(f"{name}: unknown package (the workspace has: {known})") from None

    def sibling_requirements(self, pkg: Package, extras: bool = True) -> list[tuple[Dep, Package]]:
        """Requirements of ``pkg`` that name another workspace package, with that package."""
        found = []
        for dep in pkg.requirements(extras):
            sibling = self.packages.get(canonicalize_name(dep.req.name))
            if sibling is not None:
                found.append((dep, sibling))
        return found

    def deps(self, name: str, extras: bool = True) -> set[str]:
        return {sib.name for _, sib in self.sibling_requirements(self.get(name), extras)}

    def find_cycle(self, extras: bool = True) -> list[str] | None:
        """A dependency cycle as [a, b, ..., a], or None."""
        state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
        stack: list[str] = []

        def visit(name: str) -> list[str] | None:
            state[name] = 1
            stack.append(name)
            for dep in sorted(self.deps(name, extras)):
                if state.get(dep) == 1:
                    return [*stack[stack.index(dep) :], dep]
                if dep not in state and (cycle := visit(dep)):
                    return cycle
            stack.pop()
            state[name] = 2
            return None

        for pkg in self.packages.values():
            if pkg.name not in state and (cycle := visit(pkg.name)):
                return cycle
        return None

    def order(self, names: Iterable[str] | None = None, extras: bool = True) -> list[str]:
        """Topological order (dependencies first, ties by name) of ``names`` (default: all)."""
        if cycle := self.find_cycle(extras):
            raise WorkspaceError(f"{cycle[0]}: dependency cycle: {' -> '.join(cycle)}")
        wanted = (
            {self.get(n).name for n in names}
            if names is not None
            else {p.name for p in self.packages.values()}
        )
        done: list[str] = []
        pending = sorted(wanted)
        while pending:
            # transitive: with c -> b -> a and only {a, c} wanted, a still comes first
            ready = [n for n in pending if not ((self.closure([n], extras) - {n}) & wanted) - set(done)]
            done.append(ready[0])
            pending.remove(ready[0])
        return done

    def closure(self, names: Iterable[str], extras: bool = False) -> set[str]:
        """``names`` plus everything they depend on, transitively."""
        seen: set[str] = set()
        todo = [self.get(n).name for n in names]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += self.deps(name, extras)
        return seen

    def dependents(self, names: Iterable[str], extras: bool = True) -> set[str]:
        """``names`` plus every package that depends on one of them, transitively."""
        reverse: dict[str, set[str]] = {p.name: set() for p in self.packages.values()}
        for pkg in self.packages.values():
            for dep in self.deps(pkg.name, extras):
                reverse[dep].add(pkg.name)
        seen: set[str] = set()
        todo = [self.get(n).name for n in names]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += reverse[name]
        return seen


def _requirements(raw: object, where: str, name: str, rel: str) -> tuple[Dep, ...]:
    if not isinstance(raw, list):
        raise WorkspaceError(f"{name}: {where}: expected a list of requirement strings ({rel})")
    reqs = []
    for i, item in enumerate(raw):
        try:
            reqs.append(Dep(where, str(item), Requirement(str(item))))
        except InvalidRequirement as exc:
            first = str(exc).splitlines()[0]
            raise WorkspaceError(
                f"{name}: {where}[{i}]: invalid requirement {item!r}: {first} ({rel})"
            ) from None
    return tuple(reqs)


def load_package(directory: Path, root: Path) -> Package:
    pyproject = directory / "pyproject.toml"
    rel = pyproject.relative_to(root).as_posix() if pyproject.is_relative_to(root) else str(pyproject)
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise WorkspaceError(f"{directory.name}: pyproject.toml: invalid TOML: {exc} ({rel})") from None
    project = data.get("project")
    if not isinstance(project, dict) or not isinstance(project.get("name"), str):
        raise WorkspaceError(f"{directory.name}: project.name: missing ({rel})")
    name = project["name"]

    hatch_version = data.get("tool", {}).get("hatch", {}).get("version", {})
    if "version" in project:
        version_file, raw_version = pyproject, str(project["version"])
        version_field = "project.version"
    elif isinstance(hatch_version.get("path"), str):
        version_file = directory / hatch_version["path"]
        version_field = f"{hatch_version['path']}: __version__"
        if not version_file.is_file():
            raise WorkspaceError(
                f"{name}: tool.hatch.version.path: {hatch_version['path']} does not exist ({rel})"
            )
        match = VERSION_PATTERN.search(version_file.read_text(encoding="utf-8"))
        if match is None:
            raise WorkspaceError(
                f'{name}: {version_field}: no `__version__ = "X.Y.Z"` line ({version_file.relative_to(root)})'
            )
        raw_version = match["version"]
    else:
        raise WorkspaceError(
            f"{name}: tool.hatch.version.path: missing, and no static project.version ({rel})"
        )
    try:
        version = Version(raw_version)
    except InvalidVersion:
        shown = version_file.relative_to(root) if version_file.is_relative_to(root) else version_file
        raise WorkspaceError(
            f"{name}: {version_field}: {raw_version!r} is not a valid PEP 440 version ({shown})"
        ) from None

    optional = project.get("optional-dependencies", {})
    if not isinstance(optional, dict):
        raise WorkspaceError(f"{name}: project.optional-dependencies: expected a table ({rel})")
    wheel_packages = data.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {})
    wheel_packages = wheel_packages.get("wheel", {}).get("packages", [])
    import_name = Path(wheel_packages[0]).name if wheel_packages else name.replace("-", "_")
    scripts = project.get("scripts", {})
    if not isinstance(scripts, dict):
        raise WorkspaceError(f"{name}: project.scripts: expected a table ({rel})")
    return Package(
        name=name,
        version=version,
        directory=directory,
        pyproject=pyproject,
        version_file=version_file,
        import_name=import_name,
        dependencies=_requirements(project.get("dependencies", []), "project.dependencies", name, rel),
        optional_dependencies={
            extra: _requirements(reqs, f"project.optional-dependencies.{extra}", name, rel)
            for extra, reqs in optional.items()
        },
        scripts={str(k): str(v) for k, v in scripts.items()},
    )


def load_workspace(root: Path = REPO_ROOT) -> Workspace:
    root = root.resolve()
    ws = Workspace(root)
    for pyproject in sorted(root.glob("packages/*/pyproject.toml")):
        pkg = load_package(pyproject.parent, root)
        key = canonicalize_name(pkg.name)
        if key in ws.packages:
            other = ws.rel(ws.packages[key].pyproject)
            raise WorkspaceError(f"{pkg.name}: project.name: also declared by {other} ({ws.rel(pyproject)})")
        ws.packages[key] = pkg
    if not ws.packages:
        raise WorkspaceError(f"{root}: no packages/*/pyproject.toml found (is --root the repository root?)")
    return ws


# ---------------------------------------------------------------------------------------------
# Layering: the table in the architecture document is the source of truth for who may import whom.


def default_architecture(root: Path) -> Path:
    """docs/architecture.md; until the docs exist, the steering copy beside the clone."""
    for candidate in (root / "docs" / "architecture.md", root.parent / "shared" / "ARCHITECTURE.md"):
        if candidate.is_file():
            return candidate
    return root / "docs" / "architecture.md"


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("`*").strip() for cell in line.strip().strip("|").split("|")]


def read_layering(path: Path) -> dict[str, set[str]]:
    """package -> siblings it may depend on, from the '| package | may depend on ... |' table.

    A sibling counts as allowed wherever it appears in the cell, core or in parentheses as an
    extra; names are matched against the table's own package column, so third-party names in the
    same cell (``transformers``) are ignored.
    """
    if not path.is_file():
        raise WorkspaceError(f"{path}: architecture document not found (pass --architecture)")
    lines = path.read_text(encoding="utf-8").splitlines()
    headers = [
        i
        for i, line in enumerate(lines)
        if line.lstrip().startswith("|")
        and len(cells := _cells(line)) >= 2
        and cells[0].lower() == "package"
        and "may depend on" in cells[1].lower()
    ]
    if not headers:
        raise WorkspaceError(f"{path}: no layering table (a '| package | may depend on ... |' header)")
    start = headers[0]
    rows: list[tuple[str, str]] = []
    for line in lines[start + 2 :]:  # skip the header and the |---| separator
        if not line.lstrip().startswith("|"):
            break
        cells = _cells(line)
        if len(cells) < 2 or not cells[0]:
            raise WorkspaceError(
                f"{path}: layering table row {line.strip()!r}: expected '| package | deps |'"
            )
        rows.append((cells[0], cells[1]))
    names = [canonicalize_name(name) for name, _ in rows]
    return {
        name: {
            other
            for other in names
            if other != name and re.search(rf"(?<![\w-]){re.escape(other)}(?![\w-])", cell)
        }
        for name, (_, cell) in zip(names, rows)
    }


def check(ws: Workspace, architecture: Path) -> list[str]:
    """All problems with the workspace graph, one line each (empty when it is sound)."""
    problems = []
    if cycle := ws.find_cycle():
        problems.append(f"{cycle[0]}: dependency cycle: {' -> '.join(cycle)}")
    layering = read_layering(architecture)
    shown = ws.rel(architecture)
    for key, pkg in ws.packages.items():
        rel = ws.rel(pkg.pyproject)
        if key not in layering:
            problems.append(f"{pkg.name}: not in the layering table of {shown}: add its row first ({rel})")
            continue
        allowed = layering[key]
        for dep, sibling in ws.sibling_requirements(pkg):
            if canonicalize_name(sibling.name) not in allowed:
                may = ", ".join(sorted(allowed)) or "no sibling"
                problems.append(
                    f"{pkg.name}: {dep.where}: '{dep.text}' is not allowed by the layering table of {shown}"
                    f" ({pkg.name} may depend on {may}) ({rel})"
                )
    return problems


# ---------------------------------------------------------------------------------------------
# Shared command-line plumbing for every tool.


def git(root: Path, *args: str) -> str:
    """Run git in ``root``; a failure is bad input (a ref that does not exist, not a repository)."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise WorkspaceError("git: not found on PATH") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise WorkspaceError(f"git {' '.join(args)}: {reason}")
    return done.stdout


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="workspace root (holds packages/*)")


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """Run a tool's body: bad input becomes one line on stderr and exit 2, never a traceback."""
    try:
        return main()
    except WorkspaceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def report(prog: str, problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"{prog}: error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _describe(ws: Workspace, name: str) -> dict[str, object]:
    sibs = ws.sibling_requirements(ws.get(name))
    return {
        "version": str(ws.get(name).version),
        "path": ws.rel(ws.get(name).directory),
        "dependencies": sorted({s.name for dep, s in sibs if dep.extra is None}),
        "extras": sorted({s.name for dep, s in sibs if dep.extra is not None}),
        "scripts": sorted(ws.get(name).scripts),
    }


def _graph_line(ws: Workspace, name: str) -> str:
    sibs = ws.sibling_requirements(ws.get(name))
    core = sorted({s.name for dep, s in sibs if dep.extra is None})
    extras = sorted({s.name for dep, s in sibs if dep.extra is not None} - set(core))
    shown = f"{name} {ws.get(name).version} -> {', '.join(core) or '-'}"
    return shown + (f" (extras: {', '.join(extras)})" if extras else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.workspace",
        description="The package graph of the workspace: show it, order it, check it against the architecture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    add_common_arguments(common)
    sub = parser.add_subparsers(dest="command", required=True)
    kw: dict[str, Any] = {"parents": [common], "formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    graph = sub.add_parser("graph", help="each package, its version and its sibling dependencies", **kw)
    graph.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("order", help="topological order, dependencies first (extras count as edges)", **kw)
    chk = sub.add_parser("check", help="parse every package, find cycles, check the layering table", **kw)
    chk.add_argument(
        "--architecture",
        type=Path,
        default=None,
        help="markdown file with the layering table (default: docs/architecture.md, "
        "else ../shared/ARCHITECTURE.md beside the clone)",
    )
    args = parser.parse_args(argv)
    prog = "workspace"

    def body() -> int:
        ws = load_workspace(args.root)
        if args.command == "graph":
            if args.json:
                print(json.dumps({name: _describe(ws, name) for name in ws.order()}, indent=2))
            else:
                print("\n".join(_graph_line(ws, name) for name in ws.order()))
            return 0
        if args.command == "order":
            print("\n".join(ws.order()))
            return 0
        architecture = args.architecture or default_architecture(ws.root)
        problems = check(ws, architecture)
        if not problems:
            print(f"workspace: {len(ws.packages)} packages, no cycles, layering as in {ws.rel(architecture)}")
        return report(prog, problems)

    return run_cli(prog, body)


if __name__ == "__main__":
    sys.exit(main())
