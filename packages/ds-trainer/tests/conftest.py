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


TOY_PLUGIN = Path(__file__).parent / "toy_plugin"


@pytest.fixture(scope="session")
def toy_task(tmp_path_factory) -> str:
    """The toy regression task of tests/toy_plugin, installed the way a plugin package is: its
    module on the path and an entry point ``toy-regression`` in the group ``ds_trainer.tasks``
    (a .dist-info directory), visible to this process and to the processes torchrun starts."""
    site = tmp_path_factory.mktemp("site")
    info = site / "ds_trainer_toy_task-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ds-trainer-toy-task\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[ds_trainer.tasks]\ntoy-regression = ds_trainer_toy_task:ToyRegressionTask\n"
    )
    paths = [str(TOY_PLUGIN), str(site)]
    old_path, old_env = list(sys.path), os.environ.get("PYTHONPATH")
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old_env] if old_env else []))
    yield "toy-regression"
    sys.path[:] = old_path
    if old_env is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_env


@pytest.fixture
def toy_config(tmp_path, toy_task) -> dict:
    """A toy-regression run: 256 examples, global batch 16 (micro-batch 8 x 2), 24 steps."""
    return {
        "output_dir": str(tmp_path / "toy"),
        "seed": 0,
        "task": toy_task,
        "task_options": {"hidden": 32},
        "data": {"micro_batch_size": 8, "grad_accum_steps": 2},
        "optim": {"lr": 3.0e-2, "weight_decay": 0.0},
        "schedule": {"steps": 24, "warmup_steps": 2},
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
    }
