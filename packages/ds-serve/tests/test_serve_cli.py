"""`ds-serve` command line: bad input exits 2 with one line on stderr; --help shows defaults."""

from __future__ import annotations

import subprocess
import sys


def ds_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ds_serve", *args], capture_output=True, text=True, timeout=120
    )


def test_missing_model_dir_is_one_line_exit_2(tmp_path):
    r = ds_serve("--model", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ds-serve: error: {tmp_path / 'nope'}: config.yaml: not found; "
                                             "expected a ds model directory"]  # fmt: skip


def test_bad_flag_values_exit_2(model_dir):
    r = ds_serve("--model", str(model_dir), "--max-batch", "0")
    assert r.returncode == 2 and r.stderr.strip() == "ds-serve: error: max_batch: expected >= 1, got 0"
    r = ds_serve("--model", str(model_dir), "--batching", "dynamic")
    assert r.returncode == 2 and "invalid choice: 'dynamic'" in r.stderr


def test_help_shows_defaults():
    r = ds_serve("--help")
    assert r.returncode == 0
    assert "--max-batch MAX_BATCH" in r.stdout and "(default: 8)" in r.stdout
