"""Build every package, check its metadata, and prove each one installs alone.

    python -m tools.release                          # all packages
    python -m tools.release --packages ds-quant      # ds-quant (its sibling closure is built too)
    python -m tools.release --tag ds-core-v0.2.0     # what the release workflow runs for a tag

Three stages, each reported per package in one table at the end:

1. build -- ``python -m build`` per package, in topological order, wheel and sdist into dist/;
2. metadata -- ``twine check --strict`` when twine is installed, and always our own reading of the
   wheel's METADATA and the sdist's PKG-INFO with ``packaging.metadata`` (name, version,
   Requires-Dist, the README as long description, the import package, py.typed, console scripts);
3. isolated install -- for each package a fresh venv, ``pip install --find-links dist NAME==VERSION``
   (siblings from dist/, third-party from the registry, torch held to the CPU build by
   tools/constraints.txt), then: the set of ds packages pip installed is exactly the package's
   sibling closure, each came from dist/, ``import`` gives the right ``__version__``, and every
   console script answers ``--help`` with exit 0.

All venvs share pip's cache. Exit 0 when every stage passed, 1 when one failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.metadata import Metadata
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from tools.workspace import Package, Workspace, WorkspaceError, add_common_arguments, load_workspace, run_cli

CONSTRAINTS = Path(__file__).with_name("constraints.txt")
STEP_TIMEOUT_S = 900


@dataclass
class Result:
    """What happened to one package; ``None`` means the stage did not run."""

    name: str
    version: str
    build: str | None = None
    metadata: str | None = None
    install: str | None = None
    scripts: int = 0  # console scripts run with --help in the install check
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def fail(self, stage: str, problem: str) -> None:
        setattr(self, stage, "FAIL")
        self.problems.append(f"{self.name}: {stage}: {problem}")

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Plan:
    build: list[str]  # the targets plus their sibling closure, dependencies first
    install: list[str]  # the targets, dependencies first


def make_plan(ws: Workspace, packages: Sequence[str] | None) -> Plan:
    targets = ws.order(packages) if packages else ws.order()
    # installing a package pulls its core sibling deps from dist/, so those must be built too
    return Plan(build=ws.order(ws.closure(targets, extras=False)), install=targets)


def package_for_tag(ws: Workspace, tag: str) -> Package:
    """The package a ``<pkg>-v<version>`` tag releases; its version must be the tagged one."""
    for pkg in ws.packages.values():
        prefix = f"{pkg.name}-v"
        if tag.startswith(prefix):
            try:
                tagged = Version(tag[len(prefix) :])
            except InvalidVersion:
                continue
            if tag[len(prefix) :] != str(pkg.version):  # spelled as bump writes it: the file names use it
                raise WorkspaceError(
                    f"{pkg.name}: tag {tag} says {tagged} but the package is at {pkg.version}: expected tag"
                    f" {prefix}{pkg.version} ({ws.rel(pkg.version_file)})"
                )
            return pkg
    raise WorkspaceError(f"{tag}: not a '<package>-v<version>' tag of any workspace package")


def dist_name(pkg: Package) -> str:
    """How wheel and sdist file names spell the package (PEP 427 / PEP 625)."""
    return canonicalize_name(pkg.name).replace("-", "_")


def artifact_stem(pkg: Package) -> str:
    return f"{dist_name(pkg)}-{pkg.version}"


def clean_env() -> dict[str, str]:
    """The environment for child processes: nothing that would leak the dev tree into a venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(cmd: Sequence[str | os.PathLike[str]], cwd: Path | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cmd`` in the clean environment."""
    try:
        done = subprocess.run(
            [str(c) for c in cmd],
            cwd=cwd,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {STEP_TIMEOUT_S} s: {' '.join(map(str, cmd))}"
    return done.returncode, done.stdout, done.stderr


def last_line(stdout: str, stderr: str) -> str:
    """The line that says why: the end of stderr (a traceback's last line), else of stdout."""
    for output in (stderr, stdout):
        lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "no output"


# ---------------------------------------------------------------------------------------------
# 1. build


def build(pkg: Package, dist: Path, isolation: bool) -> tuple[bool, str]:
    for old in [*dist.glob(f"{dist_name(pkg)}-*.whl"), *dist.glob(f"{dist_name(pkg)}-*.tar.gz")]:
        old.unlink()  # a stale wheel of another version must not satisfy the install check
    cmd: list[str | os.PathLike[str]] = [sys.executable, "-m", "build", "--outdir", dist, pkg.directory]
    code, out, err = run(cmd if isolation else [*cmd, "--no-isolation"])
    return code == 0, "" if code == 0 else f"python -m build exited {code}: {last_line(out, err)}"


# ---------------------------------------------------------------------------------------------
# 2. metadata


def _parse_metadata(text: str, where: str) -> tuple[Metadata | None, list[str]]:
    try:
        return Metadata.from_email(text, validate=True), []
    except Exception as exc:  # an ExceptionGroup of InvalidMetadata, one per bad field
        errors = getattr(exc, "exceptions", [exc])
        return None, [f"{where}: {getattr(e, 'field', 'metadata')}: {e}" for e in errors]


def _check_fields(pkg: Package, meta: Metadata, where: str) -> list[str]:
    problems = []
    if canonicalize_name(meta.name) != canonicalize_name(pkg.name):
        problems.append(f"{where}: Name: {meta.name!r}, expected {pkg.name!r}")
    if meta.version != pkg.version:
        problems.append(f"{where}: Version: {meta.version}, expected {pkg.version}")
    if not (meta.description or "").strip():
        problems.append(f"{where}: Description: empty (is project.readme set and README.md non-empty?)")
    if meta.description_content_type is not None and not meta.description_content_type.startswith(
        "text/markdown"
    ):
        problems.append(
            f"{where}: Description-Content-Type: {meta.description_content_type}, expected text/markdown"
        )
    return problems


def check_wheel(pkg: Package, wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"{artifact_stem(pkg)}.dist-info"
        if f"{info}/METADATA" not in names:
            return [f"{wheel.name}: no {info}/METADATA"]
        meta, problems = _parse_metadata(zf.read(f"{info}/METADATA").decode(), wheel.name)
        if meta is not None:
            problems += _check_fields(pkg, meta, wheel.name)
        for needed in ("__init__.py", "py.typed"):
            if f"{pkg.import_name}/{needed}" not in names:
                problems.append(f"{wheel.name}: {pkg.import_name}/{needed}: missing from the wheel")
        scripts: set[str] = set()
        if f"{info}/entry_points.txt" in names:
            text = zf.read(f"{info}/entry_points.txt").decode()
            section = ""
            for line in text.splitlines():
                if line.startswith("["):
                    section = line.strip("[] ")
                elif section == "console_scripts" and "=" in line:
                    scripts.add(line.split("=", 1)[0].strip())
        if scripts != set(pkg.scripts):
            problems.append(
                f"{wheel.name}: entry_points.txt: console scripts {sorted(scripts)}, expected {sorted(pkg.scripts)}"
            )
    return problems


def check_sdist(pkg: Package, sdist: Path) -> list[str]:
    top = artifact_stem(pkg)
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
        problems = [
            f"{sdist.name}: {top}/{f}: missing"
            for f in ("PKG-INFO", "pyproject.toml", "README.md")
            if f"{top}/{f}" not in names
        ]
        if f"{top}/PKG-INFO" in names:
            member = tf.extractfile(f"{top}/PKG-INFO")
            assert member is not None
            meta, found = _parse_metadata(member.read().decode(), sdist.name)
            problems += found + (_check_fields(pkg, meta, sdist.name) if meta is not None else [])
    return problems


def check_metadata(pkg: Package, dist: Path) -> list[str]:
    wheels = sorted(dist.glob(f"{artifact_stem(pkg)}-*.whl"))
    sdist = dist / f"{artifact_stem(pkg)}.tar.gz"
    problems = [] if wheels else [f"{dist}: no wheel {artifact_stem(pkg)}-*.whl (run without --skip-build)"]
    problems += [] if sdist.is_file() else [f"{dist}: no sdist {sdist.name}"]
    if problems:
        return problems
    problems = check_wheel(pkg, wheels[0]) + check_sdist(pkg, sdist)
    if shutil.which("twine"):
        code, out, err = run(["twine", "check", "--strict", wheels[0], sdist])
        if code != 0:
            problems.append(f"twine check --strict: {last_line(out, err)}")
    return problems


# ---------------------------------------------------------------------------------------------
# 3. isolated install


def sibling_pins(ws: Workspace, path: Path) -> Path:
    """Constraints holding every sibling to its workspace version, so no registry release of the
    same name (a higher 0.1.x, or a squatter) can stand in for the wheel built here."""
    path.write_text("".join(f"{p.name}=={p.version}\n" for p in ws.packages.values()), encoding="utf-8")
    return path


def install_check(
    ws: Workspace,
    pkg: Package,
    dist: Path,
    constraints: Sequence[Path],
    work: Path,
    pip_args: Sequence[str] = (),
) -> list[str]:
    """Install ``pkg`` alone in a fresh venv from dist/ plus the registry, then use it."""
    venv = work / f"venv-{pkg.name}"
    code, out, err = run([sys.executable, "-m", "venv", "--without-pip", venv])
    if code != 0:
        return [f"python -m venv: {last_line(out, err)}"]
    python = venv / "bin" / "python"
    report = work / f"{pkg.name}-install.json"
    # pip runs from this interpreter into the venv (--python): no pip bootstrap per venv, one shared cache
    cmd: list[str | os.PathLike[str]] = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    # --no-compile: byte-compiling all of torch is most of an install's time (33 s -> 8 s here);
    # the import below compiles only what it loads
    cmd += ["--no-compile", "--find-links", dist.resolve(), "--report", report]
    for constraint in constraints:
        cmd += ["--constraint", constraint]
    code, out, err = run([*cmd, *pip_args, f"{pkg.name}=={pkg.version}"])
    if code != 0:
        return [f"pip install {pkg.name}=={pkg.version}: {last_line(out, err)}"]

    problems = []
    installed = {
        canonicalize_name(i["metadata"]["name"]): i for i in json.loads(report.read_text())["install"]
    }
    ours = {canonicalize_name(p.name) for p in ws.packages.values()}
    expected = {canonicalize_name(n) for n in ws.closure([pkg.name], extras=False)}
    got = installed.keys() & ours
    if got != expected:
        problems.append(f"installed siblings {sorted(got)}, expected exactly its closure {sorted(expected)}")
    for name in sorted(got):
        url = installed[name]["download_info"]["url"]
        source = Path(unquote(urlparse(url).path))
        if not (url.startswith("file:") and source.parent == dist.resolve() and source.suffix == ".whl"):
            problems.append(f"{name} came from {url}, not from a wheel in {dist}")

    code, out, err = run(
        [python, "-I", "-c", f"import {pkg.import_name} as m; print(m.__version__)"], cwd=work
    )
    if code != 0:
        problems.append(f"import {pkg.import_name}: {last_line(out, err)}")
    elif out.strip() != str(pkg.version):  # stdout only: imports may warn on stderr
        problems.append(f"{pkg.import_name}.__version__ is {out.strip()!r}, expected {pkg.version}")
    for script in sorted(pkg.scripts):
        code, out, err = run([venv / "bin" / script, "--help"], cwd=work)
        if code != 0:
            problems.append(f"{script} --help exited {code}: {last_line(out, err)}")
    return problems


# ---------------------------------------------------------------------------------------------


def table(results: Sequence[Result]) -> str:
    head = (
        "package",
        "version",
        "build",
        "metadata",
        "install+import",
        "scripts --help",
        "seconds",
        "result",
    )
    rows = [head] + [
        (
            r.name,
            r.version,
            r.build or "-",
            r.metadata or "-",
            r.install or "-",
            str(r.scripts) if r.install else "-",
            f"{sum(r.seconds.values()):.1f}",
            "ok" if r.ok else "FAILED",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def release(
    ws: Workspace,
    plan: Plan,
    dist: Path,
    *,
    skip_build: bool = False,
    install: bool = True,
    jobs: int = 2,
    isolation: bool = True,
    constraints: Sequence[Path] = (CONSTRAINTS,),
    pip_args: Sequence[str] = (),
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[Result]:
    dist.mkdir(parents=True, exist_ok=True)
    results = {
        name: Result(name, str(ws.get(name).version), scripts=len(ws.get(name).scripts))
        for name in plan.build
    }

    def timed(name: str, stage: str, fn: Callable[[], list[str]]) -> None:
        start = time.perf_counter()
        try:
            problems = fn()
        except Exception as exc:  # one package's surprise must not hide the others' results
            problems = [f"unexpected {type(exc).__name__}: {exc}"]
        results[name].seconds[stage] = time.perf_counter() - start
        for problem in problems:
            results[name].fail(stage, problem)
        if not problems:
            setattr(results[name], stage, "ok")
        log(
            f"release: {name}: {stage} {'ok' if not problems else 'FAILED'} ({results[name].seconds[stage]:.1f} s)"
        )

    def build_one(name: str) -> list[str]:
        ok, why = build(ws.get(name), dist, isolation)
        return [] if ok else [why]

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        if not skip_build:  # submitted in topological order; builds do not need each other
            list(pool.map(lambda n: timed(n, "build", lambda: build_one(n)), plan.build))
        for name in plan.build:
            if results[name].build != "FAIL":
                pkg = ws.get(name)
                timed(name, "metadata", lambda: check_metadata(pkg, dist))  # noqa: B023 (called at once)
        if install:
            with tempfile.TemporaryDirectory(prefix="ds-release-") as tmp:
                work = Path(tmp)
                pins = sibling_pins(ws, work / "siblings.txt")

                def install_one(name: str) -> None:
                    if results[name].metadata != "ok":
                        return  # its failure is already reported; installing a broken wheel proves nothing
                    broken = sorted(n for n in ws.closure([name]) if results[n].metadata != "ok")
                    if broken:
                        results[name].fail("install", f"not tried: its dependency {', '.join(broken)} failed")
                        return
                    (work / name).mkdir()
                    timed(
                        name,
                        "install",
                        lambda: install_check(
                            ws, ws.get(name), dist, [*constraints, pins], work / name, pip_args
                        ),
                    )
                    shutil.rmtree(work / name / f"venv-{name}", ignore_errors=True)  # a torch venv is ~1 GB

                list(pool.map(install_one, plan.install))
    return [results[name] for name in plan.build]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.release",
        description="Build wheels and sdists into dist/, check metadata, install each package alone in a fresh venv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--packages", nargs="+", metavar="NAME", help="only these (None: every package)")
    which.add_argument(
        "--tag", help="a '<package>-v<version>' tag: release that package, which must be at that version"
    )
    parser.add_argument("--dist", type=Path, default=Path("dist"), help="wheelhouse, relative to --root")
    parser.add_argument("--skip-build", action="store_true", help="check what is already in --dist")
    parser.add_argument("--skip-install", action="store_true", help="stop after the metadata check")
    parser.add_argument(
        "--jobs", type=int, default=min(4, os.cpu_count() or 1), help="packages built/installed at once"
    )
    parser.add_argument(
        "--no-build-isolation",
        action="store_true",
        help="build with the current environment's hatchling (faster; CI keeps isolation)",
    )
    parser.add_argument(
        "--constraint",
        type=Path,
        action="append",
        default=None,
        help=f"pip constraints for every venv, repeatable (None: {CONSTRAINTS.relative_to(CONSTRAINTS.parents[1])})",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        ws = load_workspace(args.root)
        if args.jobs < 1:
            raise WorkspaceError(f"--jobs: {args.jobs}: expected a positive number")
        for constraint in args.constraint or []:
            if not constraint.is_file():
                raise WorkspaceError(f"--constraint: {constraint}: no such file")
        packages = [package_for_tag(ws, args.tag).name] if args.tag else args.packages
        plan = make_plan(ws, packages)
        dist = args.dist if args.dist.is_absolute() else ws.root / args.dist
        start = time.perf_counter()
        results = release(
            ws,
            plan,
            dist,
            skip_build=args.skip_build,
            install=not args.skip_install,
            jobs=args.jobs,
            isolation=not args.no_build_isolation,
            constraints=args.constraint or [CONSTRAINTS],
        )
        print(table(results))
        for result in results:
            for problem in result.problems:
                print(f"release: error: {problem}", file=sys.stderr)
        failed = [r.name for r in results if not r.ok]
        elapsed = time.perf_counter() - start
        print(
            f"release: {len(results) - len(failed)}/{len(results)} ok in {elapsed:.0f} s (jobs={args.jobs})"
        )
        return 1 if failed else 0

    return run_cli("release", body)


if __name__ == "__main__":
    sys.exit(main())
