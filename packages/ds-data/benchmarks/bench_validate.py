"""Throughput of `ds-data validate` on synthetic records, side by side with the jsonschema baseline.

    python packages/ds-data/benchmarks/bench_validate.py --n 100000

Measures, on the same JSONL file:
  ds-data       validate_files(): streaming read + json.loads + compiled schema (fastjsonschema) +
                semantic pass (spans, relation endpoints, unique ids) + duplicate record ids,
                in one process and with the default worker processes
  ds-data CLI   the `ds-data validate` command end to end (process start and imports included)
  baseline      json.loads + jsonschema.Draft202012Validator.iter_errors per record (no semantic pass)
  baseline+sem  the baseline plus the same semantic pass
Target (issue 5): >= 20,000 records/s with the semantic pass on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jsonschema

from ds_data.record_io import write_jsonl
from ds_data.records import SCHEMA, semantic_issues
from ds_data.synthetic import sample_records
from ds_data.validate import default_workers, validate_files


def _cpu() -> float:
    # This process plus reaped children (pool workers, the CLI subprocess).
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best_of(repeat: int, fn) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run). On a shared machine wall time depends on the other
    load; CPU seconds show what the work costs, i.e. the throughput of an idle core."""
    runs = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), _cpu()
        fn()
        runs.append((time.perf_counter() - t0, _cpu() - c0))
    return min(runs)


def baseline(path: str, limit: int, semantic: bool) -> int:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    n = 0
    with open(path, "rb") as f:
        for line in f:
            rec = json.loads(line)
            errors = list(validator.iter_errors(rec))
            if semantic and not errors:
                semantic_issues(rec)
            n += 1
            if n == limit:
                break
    return n


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    ap.add_argument("--n", type=int, default=100_000, help="records in the file")
    ap.add_argument("--baseline-n", type=int, default=10_000, help="records the slow baseline validates")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args()

    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews every number
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.jsonl")
        write_jsonl(sample_records(args.n, seed=0), path)
        size_mb = os.path.getsize(path) / 1e6

        summary = validate_files([path])
        assert summary.valid == args.n, summary
        t_ds = best_of(args.repeat, lambda: validate_files([path]))
        workers = default_workers()
        t_par = best_of(args.repeat, lambda: validate_files([path], workers=workers))
        cli = [sys.executable, "-m", "ds_data.cli", "validate", path]
        t_cli = best_of(args.repeat, lambda: subprocess.run(cli, check=True, capture_output=True))
        t_clin = best_of(
            args.repeat,
            lambda: subprocess.run([*cli, "--workers", str(workers)], check=True, capture_output=True),
        )
        nb = min(args.baseline_n, args.n)
        t_base = best_of(args.repeat, lambda: baseline(path, nb, semantic=False))
        t_base_sem = best_of(args.repeat, lambda: baseline(path, nb, semantic=True))

    timed = {
        "ds-data validate_files, 1 process": (args.n, t_ds),
        f"ds-data validate_files, workers={workers}": (args.n, t_par),
        "ds-data validate CLI end to end (default: 1 process)": (args.n, t_cli),
        f"ds-data validate CLI end to end (--workers {workers})": (args.n, t_clin),
        "baseline: jsonschema Draft202012Validator": (nb, t_base),
        "baseline + semantic pass": (nb, t_base_sem),
    }
    rows = {name: n / wall for name, (n, (wall, _)) in timed.items()}
    cpu_rows = {name: n / cpu for name, (n, (_, cpu)) in timed.items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "records": args.n,
        "file_mb": round(size_mb, 1),
        "records_per_s": {k: round(v) for k, v in rows.items()},
        "records_per_cpu_s": {k: round(v) for k, v in cpu_rows.items()},
        "load_average_1m_before": load_before,
        "speedup_vs_jsonschema": round(
            rows["ds-data validate_files, 1 process"] / rows["baseline: jsonschema Draft202012Validator"], 1
        ),
        "target_met": rows["ds-data validate_files, 1 process"] >= 20_000,
    }
    print(
        f"{args.n} synthetic records, {size_mb:.1f} MB JSONL, best of {args.repeat}, "
        f"load average before: {load_before}"
    )
    print(f"  {'':66s} {'records/s':>10s} {'per CPU-s':>10s}")
    for name in rows:
        print(f"  {name:66s} {rows[name]:>10,.0f} {cpu_rows[name]:>10,.0f}")
    print(
        f"  speed-up over jsonschema (1 process, wall): {result['speedup_vs_jsonschema']}x; "
        f"target (>= 20,000 records/s with the semantic pass) met: {result['target_met']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
