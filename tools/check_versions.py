"""Version consistency across the workspace.

    python -m tools.check_versions

Checks, for every package:

* its version is a valid PEP 440 version (read where hatchling reads it);
* every sibling requirement (core or extra) is a bounded range -- no ``==``/``===`` pin (a
  ``==0.1.*`` prefix is a range), an upper bound present -- and admits the sibling's current version, so the packages released together
  install together;
* if the package changed since its last ``<pkg>-v<version>`` tag, its version moved past the tag
  and its CHANGELOG.md has a heading for the new version.

Each problem is one line, ``<package>: <what> (<file>)``, and any problem exits 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.version import InvalidVersion, Version

from tools.workspace import Package, Workspace, add_common_arguments, git, load_workspace, report, run_cli

PINS = {"==", "==="}
UPPER_BOUNDS = {"<", "<=", "~="}


def next_breaking(version: Version) -> str:
    """The first version a caller should not assume compatible: 0.x breaks on minor, else on major."""
    major, minor = (*version.release, 0)[:2]
    return f"0.{minor + 1}" if major == 0 else f"{major + 1}"


def suggested_range(name: str, version: Version) -> str:
    major, minor = (*version.release, 0)[:2]
    return f"{name}>={major}.{minor},<{next_breaking(version)}"


def check_ranges(ws: Workspace) -> list[str]:
    problems = []
    for pkg in ws.packages.values():
        rel = ws.rel(pkg.pyproject)
        for dep, sibling in ws.sibling_requirements(pkg):
            kind = "dependency" if dep.extra is None else f"optional dependency [{dep.extra}]"
            suggestion = suggested_range(sibling.name, sibling.version)
            # ==0.1.* is a prefix match, a range with an upper bound; ==0.1.0 is a pin
            pins = [str(s) for s in dep.req.specifier if s.operator in PINS and not s.version.endswith(".*")]
            bounded = any(s.operator in UPPER_BOUNDS or s.version.endswith(".*") for s in dep.req.specifier)
            if pins:
                problems.append(
                    f"{pkg.name}: {kind} '{dep.text}' pins {sibling.name} with '{pins[0]}':"
                    f" siblings are declared as ranges, e.g. '{suggestion}' ({rel})"
                )
            elif not bounded:
                problems.append(
                    f"{pkg.name}: {kind} '{dep.text}' has no upper bound on {sibling.name}:"
                    f" declare a range such as '{suggestion}' ({rel})"
                )
            if not dep.req.specifier.contains(sibling.version, prereleases=True):
                problems.append(
                    f"{pkg.name}: {kind} '{dep.text}' excludes {sibling.name} {sibling.version} ({rel})"
                )
    return problems


def last_tag(ws: Workspace, pkg: Package) -> tuple[str, Version] | None:
    """The highest ``<pkg>-v<version>`` tag, or None before the first release."""
    found = []
    for tag in git(ws.root, "tag", "--list", f"{pkg.name}-v*").split():
        try:
            found.append((Version(tag[len(pkg.name) + 2 :]), tag))
        except InvalidVersion:
            continue  # another package's tag with a longer name, e.g. ds-core-vision-v1.0
    if not found:
        return None
    version, tag = max(found)
    return tag, version


def changed_files(ws: Workspace, since: str, path: Path) -> list[str]:
    """Files under ``path`` that differ from ``since`` in the work tree, untracked ones included."""
    rel = ws.rel(path)
    tracked = git(ws.root, "diff", "--name-only", since, "--", rel).split()
    untracked = git(ws.root, "ls-files", "--others", "--exclude-standard", "--", rel).split()
    return sorted(set(tracked) | set(untracked))


def has_changelog_entry(pkg: Package) -> bool:
    changelog = pkg.directory / "CHANGELOG.md"
    if not changelog.is_file():
        return False
    version = re.escape(str(pkg.version))
    heading = rf"^#{{1,6}}\s+(?:{re.escape(pkg.name)}\s+)?\[?v?{version}\]?(?![\w.+])"
    return re.search(heading, changelog.read_text(encoding="utf-8"), re.MULTILINE) is not None


def check_released(ws: Workspace) -> list[str]:
    problems = []
    for pkg in ws.packages.values():
        tagged = last_tag(ws, pkg)
        if tagged is None:
            continue
        tag, released = tagged
        changed = changed_files(ws, tag, pkg.directory)
        if not changed:
            continue
        where = ws.rel(pkg.version_file)
        first = f"{changed[0]}" + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
        if pkg.version <= released:
            problems.append(
                f"{pkg.name}: changed since {tag} ({first}) but its version is {pkg.version}:"
                f" bump it past {released} (python -m tools.bump {pkg.name} patch) ({where})"
            )
        elif not has_changelog_entry(pkg):
            problems.append(
                f"{pkg.name}: version {pkg.version} has no CHANGELOG.md heading '## {pkg.version}'"
                f" ({ws.rel(pkg.directory / 'CHANGELOG.md')})"
            )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.check_versions",
        description="Check sibling version ranges and that changed packages were bumped since their last tag.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--no-tags",
        action="store_true",
        help="skip the changed-since-last-tag check (e.g. outside a git clone)",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        ws = load_workspace(args.root)
        problems = check_ranges(ws)
        if not args.no_tags:
            problems += check_released(ws)
        if not problems:
            ranges = sum(len(ws.sibling_requirements(p)) for p in ws.packages.values())
            versions = ", ".join(f"{p.name} {p.version}" for p in ws.packages.values())
            print(f"check_versions: {ranges} sibling ranges admit {versions}")
        return report("check_versions", problems)

    return run_cli("check_versions", body)


if __name__ == "__main__":
    sys.exit(main())
