"""Shared fixtures: a tiny training config on ds-data's built-in corpus, and a CLI runner.

Everything is real: ds-tiny models, a BPE tokenizer trained once per session on the built-in
corpus, packed with ds-data, trained with accelerate on CPU, launched with torchrun over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Pack caches go to a per-session directory, not ~/.cache."""
    path = tmp_path_factory.mktemp("ds-data-cache")
    old = os.environ.get("DS_DATA_CACHE")
    os.environ["DS_DATA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DS_DATA_CACHE", None)
    else:
        os.environ["DS_DATA_CACHE"] = old


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A 512-token byte-level BPE on the built-in corpus (ds-tiny's vocab size), trained once."""
    import ds_data

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    ds_data.train_tokenizer(ds_data.load_corpus("builtin")["train"], 512, str(path))
    return str(path)


@pytest.fixture
def tiny_config(tmp_path, tokenizer_path) -> dict:
    """A ds-tiny run that takes a second or two: 128 sequences of 32 tokens, global batch 8."""
    return {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {"path": "ds-tiny"},
        "data": {
            "tokenizer": tokenizer_path,
            "seq_len": 32,
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "max_train_sequences": 128,
            "max_eval_sequences": 16,
        },
        "optim": {"lr": 3.0e-3},
        "schedule": {"steps": 8, "warmup_steps": 2},
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
    }


@pytest.fixture
def write_config(tmp_path):
    def write(cfg: dict, name: str = "train.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    return write


@pytest.fixture
def run_cli():
    """Run ``ds-train ARGS`` in a fresh interpreter; returns CompletedProcess (text)."""

    def run(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "ds_trainer.cli", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
        )

    return run


@pytest.fixture
def losses_of():
    """step -> loss of a run's metrics.jsonl (the last record per step)."""

    def read(output_dir: str | Path) -> dict[int, float]:
        out = {}
        for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
        return out

    return read
