"""Bump one package's version, add its CHANGELOG heading, optionally widen its dependents' ranges.

    python -m tools.bump ds-core minor                 # 0.1.0 -> 0.2.0
    python -m tools.bump ds-core 0.2.0 --cascade       # and let every dependent admit 0.2.0

The version is written where hatchling reads it (``[tool.hatch.version] path``). With
``--cascade`` each sibling range that would exclude the new version is widened (its upper bound
moves to the next breaking release, its lower bound stays) and that dependent is bumped by a patch
with a CHANGELOG line saying why -- transitively, so ``tools.check_versions`` passes afterwards.
Without it, the ranges the bump breaks are listed so you can decide.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence

from packaging.specifiers import Specifier
from packaging.version import InvalidVersion, Version

from tools.check_versions import next_breaking
from tools.workspace import (
    VERSION_PATTERN,
    Dep,
    Package,
    Workspace,
    WorkspaceError,
    add_common_arguments,
    load_workspace,
    run_cli,
    write_atomic,
)

STATIC_VERSION = re.compile(r"""^version\s*=\s*(['"])(?P<version>[^'"]+)\1""", re.MULTILINE)


def next_version(pkg: Package, part: str) -> Version:
    """``part`` is major, minor, patch or an explicit version, which must be above the current one."""
    major, minor, patch = (*pkg.version.release, 0, 0)[:3]
    if part == "major":
        return Version(f"{major + 1}.0.0")
    if part == "minor":
        return Version(f"{major}.{minor + 1}.0")
    if part == "patch":
        return Version(f"{major}.{minor}.{patch + 1}")
    try:
        version = Version(part)
    except InvalidVersion:
        raise WorkspaceError(
            f"{pkg.name}: version: {part!r} is neither major/minor/patch nor a valid PEP 440 version"
        ) from None
    if version <= pkg.version:
        raise WorkspaceError(f"{pkg.name}: version: {version} is not above the current {pkg.version}")
    return version


def widened(dep: Dep, version: Version) -> str:
    """``dep`` rewritten to admit ``version``: same name, extras, lower bound and marker; new upper bound."""
    req = dep.req
    lower, other = [], []
    for spec in req.specifier:
        if spec.operator in (">", ">="):
            lower.append(str(spec))
        elif spec.operator == "~=":  # ~=X.Y means >=X.Y,<(X+1); keep its lower half
            lower.append(f">={spec.version}")
        elif spec.operator not in ("<", "<=", "==", "==="):
            other.append(str(spec))
    if not lower:
        major, minor = (*version.release, 0)[:2]
        lower.append(f">={major}.{minor}")
    specs = [*lower, *other, f"<{next_breaking(version)}"]
    if not all(Specifier(s).contains(version, prereleases=True) for s in specs):
        raise WorkspaceError(
            f"'{dep.text}': cannot widen to admit {version} (a lower bound or != excludes it)"
        )
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{extras}{','.join(specs)}{marker}"


def set_version(pkg: Package, version: Version) -> tuple[str, str]:
    """(path, new text) of the file that holds the version."""
    text = pkg.version_file.read_text(encoding="utf-8")
    pattern = STATIC_VERSION if pkg.version_file == pkg.pyproject else VERSION_PATTERN
    match = pattern.search(text)
    assert match is not None, "load_package already found it"
    return str(pkg.version_file), text[: match.start("version")] + str(version) + text[match.end("version") :]


def add_changelog(pkg: Package, version: Version, notes: list[str]) -> tuple[str, str] | None:
    """(path, new text) with a '## <version>' heading above the previous ones; None if it exists."""
    path = pkg.directory / "CHANGELOG.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# Changelog — {pkg.name}\n\n"
    if re.search(rf"^#{{1,6}}\s+\[?v?{re.escape(str(version))}\]?(?![\w.+])", text, re.MULTILINE):
        return None
    entry = f"## {version}\n\n" + "".join(f"- {note}\n" for note in notes) + ("\n" if notes else "")
    first = re.search(r"^## ", text, re.MULTILINE)
    at = first.start() if first else len(text)
    if not first and not text.endswith("\n\n"):
        entry = ("\n" if text.endswith("\n") else "\n\n") + entry
    return str(path), text[:at] + entry + text[at:]


def plan(
    ws: Workspace, name: str, part: str, cascade: bool, note: str | None
) -> tuple[list[str], dict[str, str]]:
    """What the bump does: (report lines, path -> new text). Writes nothing."""
    root = ws.get(name)
    versions = {root.name: next_version(root, part)}
    notes: dict[str, list[str]] = {root.name: [note] if note else []}
    lines = [f"{root.name}: {root.version} -> {versions[root.name]}"]
    ranges: dict[str, dict[str, str]] = {}  # package -> {old requirement text: new text}
    todo = [root.name]
    while todo:
        bumped = todo.pop(0)
        for pkg in ws.packages.values():
            for dep, sibling in ws.sibling_requirements(pkg):
                if sibling.name != bumped or dep.req.specifier.contains(versions[bumped], prereleases=True):
                    continue
                if not cascade:
                    lines.append(
                        f"{pkg.name}: dependency '{dep.text}' excludes {bumped} {versions[bumped]}"
                        f" ({ws.rel(pkg.pyproject)}): rerun with --cascade or widen it by hand"
                    )
                    continue
                replace = ranges.setdefault(pkg.name, {})
                if dep.text in replace:
                    continue  # the same string declared again (core and an extra): one edit covers both
                replace[dep.text] = new = widened(dep, versions[bumped])
                lines.append(f"{pkg.name}: '{dep.text}' -> '{new}'")
                notes.setdefault(pkg.name, []).append(f"Admit {bumped} {versions[bumped]}: requires '{new}'.")
                if pkg.name not in versions:
                    versions[pkg.name] = next_version(pkg, "patch")
                    lines.append(f"{pkg.name}: {pkg.version} -> {versions[pkg.name]}")
                    todo.append(pkg.name)

    writes: dict[str, str] = {}
    for pkg_name, version in versions.items():
        pkg = ws.get(pkg_name)
        path, text = set_version(pkg, version)
        writes[path] = text
        if (changelog := add_changelog(pkg, version, notes[pkg_name])) is not None:
            writes[changelog[0]] = changelog[1]
    for pkg_name, replace in ranges.items():
        pkg = ws.get(pkg_name)
        text = writes.get(str(pkg.pyproject), pkg.pyproject.read_text(encoding="utf-8"))
        for old, new in replace.items():
            quoted = [q for q in ('"', "'") if f"{q}{old}{q}" in text]
            if not quoted:
                raise WorkspaceError(f"{pkg_name}: cannot find the string '{old}' in {ws.rel(pkg.pyproject)}")
            for q in quoted:
                text = text.replace(f"{q}{old}{q}", f"{q}{new}{q}")
        tomllib.loads(text)  # the edit must leave valid TOML
        writes[str(pkg.pyproject)] = text
    return lines, writes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bump",
        description="Bump a package's version and CHANGELOG; --cascade widens dependents' ranges.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("package", help="package name, e.g. ds-core")
    parser.add_argument("part", metavar="major|minor|patch|X.Y.Z", help="what to bump, or the new version")
    parser.add_argument(
        "--cascade",
        action="store_true",
        help="widen dependent sibling ranges to admit it and patch-bump them",
    )
    parser.add_argument("--note", default=None, help="CHANGELOG line for the new version")
    parser.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    args = parser.parse_args(argv)

    def body() -> int:
        ws = load_workspace(args.root)
        lines, writes = plan(ws, args.package, args.part, args.cascade, args.note)
        print("\n".join(lines))
        if not args.dry_run:
            for path, text in writes.items():
                write_atomic(ws.root / path, text)
        return 0

    return run_cli("bump", body)


if __name__ == "__main__":
    sys.exit(main())
