"""Every package's own `hatch test` works: pip (not uv), the CPU torch pin, and its sibling closure
installed before the project (a package once lost this section and `hatch test` fell back to uv)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _siblings(pyproject: dict, names: set[str]) -> set[str]:
    reqs = [Requirement(r) for r in pyproject["project"].get("dependencies", [])]
    return {r.name for r in reqs if r.name in names}


def test_every_package_has_a_pip_hatch_test_env_with_its_sibling_closure() -> None:
    projects = {
        p.parent.name: tomllib.loads(p.read_text()) for p in (ROOT / "packages").glob("*/pyproject.toml")
    }
    names = set(projects)
    direct = {n: _siblings(pp, names) for n, pp in projects.items()}

    def closure(n: str) -> set[str]:
        out: set[str] = set()
        todo = list(direct[n])
        while todo:
            d = todo.pop()
            if d not in out:
                out.add(d)
                todo.extend(direct[d])
        return out

    for name, pp in projects.items():
        env = pp.get("tool", {}).get("hatch", {}).get("envs", {}).get("hatch-test")
        assert env is not None, f"{name}: no [tool.hatch.envs.hatch-test] (hatch test would use uv)"
        assert env.get("installer") == "pip", f"{name}: hatch-test must set installer = 'pip'"
        pre = " ".join(env.get("pre-install-commands", []))
        assert "torch==2.13.0" in pre, f"{name}: hatch-test must install torch==2.13.0 before the project"
        members = {Path(m).name for m in env.get("workspace", {}).get("members", [])}
        missing = closure(name) - members
        assert not missing, f"{name}: hatch-test workspace.members lacks {sorted(missing)}"
        for sib in closure(name):
            assert f"../{sib}" in pre, f"{name}: pre-install does not install ../{sib}"
