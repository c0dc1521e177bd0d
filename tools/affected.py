"""Which packages a change touches: the changed ones plus everything that depends on them.

    python -m tools.affected                       # diff against the merge-base with origin/main
    python -m tools.affected --base HEAD~3 --format list
    python -m tools.affected --files packages/ds-core/src/ds_core/sparse_mlp.py
    python -m tools.affected --packages ds-data

A change under packages/<dir>/ affects that package and, transitively, its reverse dependents
(extras count: ds-bench is retested when ds-quant changes). A change to the shared build and CI
files (pyproject.toml, hatch.toml, tools/, .github/, .ci/) affects every package. Anything else
(docs/, README.md) affects none. The default output is a GitHub Actions matrix, ``{"package": [...]}``
in topological order. A path under packages/ that is no workspace package, or an unknown name
given to --packages, exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tools.workspace import Workspace, WorkspaceError, add_common_arguments, git, load_workspace, run_cli

ROOT_FILES = {"pyproject.toml", "hatch.toml"}
ROOT_DIRS = ("tools/", ".github/", ".ci/")


def changed_paths(ws: Workspace, base: str) -> list[str]:
    """Paths changed between the merge-base of ``base`` and HEAD and the work tree (untracked included)."""
    merge_base = git(ws.root, "merge-base", base, "HEAD").strip()
    tracked = git(ws.root, "diff", "--name-only", merge_base).split()
    untracked = git(ws.root, "ls-files", "--others", "--exclude-standard").split()
    return sorted(set(tracked) | set(untracked))


def affected(ws: Workspace, paths: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The affected packages in topological order, and why each one is (package -> reason)."""
    by_dir = {pkg.directory.name: pkg.name for pkg in ws.packages.values()}
    why: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        path = Path(ws.rel(path)) if path.is_absolute() else path
        posix = path.as_posix()
        if posix in ROOT_FILES or posix.startswith(ROOT_DIRS):
            return ws.order(), dict.fromkeys(ws.order(), f"workspace file changed: {posix}")
        parts = path.parts
        if len(parts) >= 3 and parts[0] == "packages":
            if parts[1] not in by_dir:
                raise WorkspaceError(
                    f"{parts[1]}: unknown package in the diff ({posix}); the workspace has: {', '.join(sorted(by_dir))}"
                )
            why.setdefault(by_dir[parts[1]], f"changed: {posix}")
    return _with_dependents(ws, why)


def _with_dependents(ws: Workspace, why: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    for name in list(why):
        for dependent in ws.dependents([name]) - {name}:
            why.setdefault(dependent, f"depends on {name}")
    return ws.order(why), why


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.affected",
        description="List the packages a change affects (changed ones plus reverse dependents).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--base", default="origin/main", help="git ref to diff against (through its merge-base with HEAD)"
    )
    source.add_argument("--files", nargs="+", metavar="PATH", help="changed paths, relative to --root")
    source.add_argument("--packages", nargs="+", metavar="NAME", help="changed packages, by name")
    source.add_argument("--all", action="store_true", help="every package (e.g. a push that opens a branch)")
    parser.add_argument(
        "--format",
        choices=["matrix", "list"],
        default="matrix",
        help="matrix: GitHub Actions JSON {'package': [...]}; list: one name per line",
    )
    parser.add_argument("--why", action="store_true", help="print why each package is affected, on stderr")
    args = parser.parse_args(argv)

    def body() -> int:
        ws = load_workspace(args.root)
        if args.all:
            names, why = ws.order(), {p.name: "--all" for p in ws.packages.values()}
        elif args.packages:
            names, why = _with_dependents(
                ws, {ws.get(n).name: "named on the command line" for n in args.packages}
            )
        else:
            names, why = affected(ws, args.files if args.files is not None else changed_paths(ws, args.base))
        if args.why:
            for name in names:
                print(f"{name}: {why[name]}", file=sys.stderr)
        print(json.dumps({"package": names}) if args.format == "matrix" else "\n".join(names))
        return 0

    return run_cli("affected", body)


if __name__ == "__main__":
    sys.exit(main())
