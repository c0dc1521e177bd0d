"""The result file: one JSON document per `ds-bench run`, versioned so old files are refused clearly.

    {
      "format": "ds-bench-result", "format_version": 1, "created": ISO time, "label": str,
      "model": {"dir", "params", "weight_bytes", "dtype", "quant", ...},
      "backend": {"name", "device", "dtype", ...}, "scenario": str,
      "device": {"type", "name", ...}, "versions": {distribution: version}, "seed": int,
      "settings": {...every knob of the run...}, "eval": {"source", "tokens", ...},
      "valid": bool, "loadgen": {"result": "VALID"|"INVALID", "detail": {...}, ...},
      "metrics": {name: {"value": float | {part: float} | null, "unit": str, "unavailable": reason}},
      "requests": {"arrival", "completion", "token_times"}   seconds from the first arrival
    }

The requests are kept so any metric can be recomputed from the file (`records(result)`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ds_bench.errors import BenchError
from ds_bench.metrics import METRICS, Request, Unavailable, Value

FORMAT = "ds-bench-result"
FORMAT_VERSION = 1
REQUIRED = ("label", "model", "backend", "scenario", "device", "versions", "seed", "valid", "metrics")

DISTRIBUTIONS = (
    "ds-bench", "ds-models", "ds-core", "ds-quant", "torch", "transformers", "onnxruntime",
    "mlcommons-loadgen", "numpy", "nvidia-ml-py", "lm-eval",
)  # fmt: skip


def library_versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            # ds packages run from a source tree (PYTHONPATH) are not installed: ask the module.
            if dist.startswith("ds-"):
                with contextlib.suppress(ImportError):
                    out[dist] = importlib.import_module(dist.replace("-", "_") + ".__about__").__version__
    return out


def metric_entries(values: dict[str, Value]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, value in values.items():
        entry: dict[str, Any] = {"unit": METRICS[name].unit}
        if isinstance(value, Unavailable):
            entry["value"] = None
            entry["unavailable"] = value.reason
        else:
            entry["value"] = value
        out[name] = entry
    return out


def requests_entry(records: list[Request]) -> dict[str, list]:
    if not records:
        return {"arrival": [], "completion": [], "token_times": [], "prompt_tokens": []}
    t0 = min(r.arrival for r in records)

    def rel(t: float) -> float:
        return round(t - t0, 7)

    return {
        "arrival": [rel(r.arrival) for r in records],
        "completion": [rel(r.completion) for r in records],
        "token_times": [[rel(t) for t in r.token_times] for r in records],
        "prompt_tokens": [r.prompt_tokens for r in records],
    }


def records(result: dict) -> list[Request]:
    """The per-request records stored in a result (times relative to the first arrival)."""
    req = result.get("requests") or {}
    return [
        Request(a, list(tt), c, p)
        for a, c, tt, p in zip(
            req.get("arrival", []),
            req.get("completion", []),
            req.get("token_times", []),
            req.get("prompt_tokens", []),
        )
    ]


def metric_value(result: dict, name: str) -> float | dict | None:
    entry = result["metrics"].get(name) or {}
    return entry.get("value")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_result(path: str | os.PathLike[str]) -> dict:
    """Read and check a result file; BenchError names the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: line {e.lineno}: not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BenchError(f'{path}: format: not a ds-bench result (expected "format": "{FORMAT}")')
    version = data.get("format_version")
    if not isinstance(version, int):
        raise BenchError(f"{path}: format_version: missing or not an integer")
    if version < FORMAT_VERSION:
        raise BenchError(
            f"{path}: format_version: {version} is older than this ds-bench's {FORMAT_VERSION}; re-run `ds-bench run` to refresh it"
        )
    if version > FORMAT_VERSION:
        raise BenchError(
            f"{path}: format_version: {version} is newer than this ds-bench's {FORMAT_VERSION}; upgrade ds-bench"
        )
    for key in REQUIRED:
        if key not in data:
            raise BenchError(f"{path}: {key}: missing")
    if not isinstance(data["metrics"], dict):
        raise BenchError(f"{path}: metrics: expected a mapping of metric name to entry")
    return data
