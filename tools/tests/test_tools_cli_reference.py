"""docs/reference/cli.md is what the parsers print today (regenerate with `python -m tools.cli_reference`)."""

from __future__ import annotations

import pytest

from tools import cli_reference


def test_cli_reference_page_is_current() -> None:
    pytest.importorskip("ds_trainer", reason="needs the packages installed (hatch test at the root)")
    assert cli_reference.PAGE.read_text(encoding="utf-8") == cli_reference.render(), (
        "docs/reference/cli.md is stale: run `python -m tools.cli_reference`"
    )


def test_every_console_script_is_documented() -> None:
    pytest.importorskip("ds_trainer", reason="needs the packages installed (hatch test at the root)")
    text = cli_reference.render()
    for prog in ("ds-data", "ds-models", "ds-train", "ds-quant", "ds-bench"):
        assert f"## `{prog}`" in text
