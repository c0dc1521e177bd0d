"""`ds-bench`: run a benchmark, compare results, export them, evaluate with lm-eval.

    ds-bench run --model DIR --backend torch|torch-fast|onnx|hf --scenario singlestream|server|offline
                 [--config run.yaml] [key=value ...] --out result.json
    ds-bench compare A.json B.json ... [--charts DIR] [--markdown FILE] [--layout rows]
    ds-bench export-optimum result.json --out benchmark_report.json
    ds-bench metrics                      the 18 metrics with units and definitions
    ds-bench lm-eval --model DIR --tasks NAME[,NAME] [--include-path DIR]

Settings of `run` come from the defaults, then --config YAML, then flags, then key=value (last wins).
Exit codes: 0 ok, 1 the run failed (or was INVALID under --require-valid), 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from ds_bench.__about__ import __version__
from ds_bench.errors import BenchError

PROG = "ds-bench"

# RunConfig fields that get a flag (the rest, and these too, can be set in YAML or as key=value).
_RUN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    (
        "model",
        dict(help="ds model directory (for --backend onnx: a directory from `ds-quant export --onnx`)"),
    ),
    ("backend", dict(help="torch | torch-fast | onnx | hf")),
    ("scenario", dict(help="MLPerf LoadGen scenario: singlestream | server | offline")),
    ("device", dict(help="cpu or cuda[:N]")),
    ("dtype", dict(help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")),
    (
        "threads",
        dict(type=int, help="CPU threads for torch / onnxruntime (default: the library's own choice)"),
    ),
    ("seed", dict(type=int, help="seeds prompts, sampling of the workload and LoadGen's schedule")),
    ("label", dict(help="name of this run in tables and charts (default: model backend precision scenario)")),
    ("samples", dict(type=int, help="distinct prompts in LoadGen's sample library")),
    ("prompt_len", dict(type=int, help="prompt tokens per request")),
    ("gen_tokens", dict(type=int, help="generated tokens per request")),
    ("batch_size", dict(type=int, help="most requests served together (offline, server)")),
    ("min_duration", dict(type=float, help="LoadGen min_duration in seconds")),
    ("max_duration", dict(type=float, help="LoadGen max_duration in seconds")),
    (
        "min_query_count",
        dict(
            type=int,
            help="LoadGen min_query_count (default: what its early stopping needs at --latency-percentile: "
            "singlestream 64, server 113 at p90, which absorbs 4 over-latency queries)",
        ),
    ),
    ("latency_percentile", dict(type=float, help="percentile LoadGen judges latency targets at")),
    (
        "target_qps",
        dict(type=float, help="server arrival rate (default: 0.35 / median single-request latency)"),
    ),
    ("target_latency_ms", dict(type=float, help="latency target for goodput / server")),
    ("target_ttft_ms", dict(type=float, help="TTFT target for goodput / server")),
    ("target_tpot_ms", dict(type=float, help="TPOT target for goodput / server")),
    (
        "eval_data",
        dict(help=".txt or .jsonl (field text) for accuracy and perplexity (default: random tokens)"),
    ),
    ("eval_tokens", dict(type=int, help="tokens scored in the accuracy pass")),
    ("eval_seq_len", dict(type=int, help="window length of the accuracy pass")),
    ("reference", dict(help="a result file; accuracy_delta is measured against its accuracy")),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_run_flags(p: argparse.ArgumentParser, defaults: dict[str, Any] | None) -> None:
    for name, kw in _RUN_FLAGS:
        flag = "--" + name.replace("_", "-")
        if defaults is None:
            p.add_argument(flag, dest=name, default=argparse.SUPPRESS, **kw)
        else:
            p.add_argument(flag, dest=name, default=defaults.get(name), **kw)


def build_parser() -> argparse.ArgumentParser:
    from ds_bench.runner import RunConfig

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Benchmarks for ds models: 18 metrics, MLPerf LoadGen scenarios.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    defaults = {
        f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING
    }
    defaults["model"] = None
    run = sub.add_parser("run", help="run one benchmark and write a JSON result", formatter_class=fmt)
    _add_run_flags(run, defaults)
    run.add_argument("--config", help="YAML file of run settings (RunConfig fields)")
    run.add_argument(
        "--out", default="ds-bench-result.json", help="result file (LoadGen logs go to OUT.loadgen/)"
    )
    run.add_argument("--require-valid", action="store_true", help="exit 1 when LoadGen says INVALID")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="settings overriding everything else")

    cmp_ = sub.add_parser(
        "compare", help="Markdown table (stdout) and PNG charts of results", formatter_class=fmt
    )
    cmp_.add_argument("results", nargs="+", help="result files from `ds-bench run`")
    cmp_.add_argument("--charts", help="directory to write PNG charts to (needs ds-bench[charts])")
    cmp_.add_argument("--markdown", help="also write the table to this file")
    cmp_.add_argument(
        "--layout",
        choices=("columns", "rows"),
        default="columns",
        help="columns: one column per result; rows: one row per result (for many results)",
    )

    exp = sub.add_parser(
        "export-optimum", help="a result as an optimum-benchmark benchmark_report.json", formatter_class=fmt
    )
    exp.add_argument("result")
    exp.add_argument("--out", default="benchmark_report.json")

    sub.add_parser("metrics", help="print the metric registry as a Markdown table", formatter_class=fmt)

    lme = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a ds model", formatter_class=fmt)
    lme.add_argument("--model", required=True, help="ds model directory with tokenizer.json")
    lme.add_argument("--backend", default="torch", help="torch | torch-fast | onnx | hf")
    lme.add_argument("--device", default="cpu")
    lme.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    lme.add_argument("--include-path", help="directory of extra task YAMLs")
    lme.add_argument(
        "--only-include-path",
        action="store_true",
        help="index only the tasks under --include-path, not lm-eval's own (faster; local tasks only)",
    )
    lme.add_argument("--limit", type=int, help="documents per task")
    lme.add_argument("--out", help="write the lm-eval results JSON here")
    return parser


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_config_from_args(args: argparse.Namespace, argv: list[str]):
    """Defaults < --config YAML < explicit flags < key=value."""
    import yaml

    from ds_bench.runner import RunConfig

    settings: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BenchError(f"--config: {path}: no such file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise BenchError(f"{path}: {where}invalid YAML") from None
        if not isinstance(data, dict):
            raise BenchError(f"{path}: expected a mapping of setting: value")
        settings.update(data)
    # Flags the user actually typed: re-parse with every default suppressed.
    explicit = _Parser(add_help=False)
    _add_run_flags(explicit, None)
    known, _ = explicit.parse_known_args(argv[1:])
    settings.update(vars(known))
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"override {item!r}: expected key=value")
        settings[key.replace("-", "_")] = _parse_value(value)
    where = args.config or "settings"
    try:
        return RunConfig.from_dict(settings, where=where)
    except TypeError as e:
        raise BenchError(f"{where}: {e}") from None


def _progress(quiet: bool):
    if quiet:
        return None, None
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)

    def say(msg: str) -> None:
        console.print(f"[bold]{PROG}[/bold] {msg}")

    def progress(items, what):
        return track(items, description=what, console=console, transient=True)

    return say, progress


def cmd_run(args, argv) -> int:
    from ds_bench.result import write_json_atomic
    from ds_bench.runner import run

    cfg = run_config_from_args(args, argv)
    out = Path(args.out)
    say, progress = _progress(args.quiet)
    result = run(cfg, log_dir=cfg.log_dir or out.with_name(out.name + ".loadgen"), progress=progress, say=say)
    write_json_atomic(out, result)
    if say:
        say(f"{result['loadgen']['result']}: {out}")
    return 1 if args.require_valid and not result["valid"] else 0


def cmd_compare(args) -> int:
    from ds_bench.compare import markdown_rows, markdown_table, write_charts
    from ds_bench.result import load_result

    results = [load_result(p) for p in args.results]
    table = markdown_rows(results) if args.layout == "rows" else markdown_table(results)
    print(table)
    if args.markdown:
        _write_text(Path(args.markdown), table + "\n")
    if args.charts:
        for path in write_charts(results, args.charts):
            print(f"{PROG}: wrote {path}", file=sys.stderr)
    return 0


def cmd_export_optimum(args) -> int:
    from ds_bench.optimum_report import to_optimum_report
    from ds_bench.result import load_result, write_json_atomic

    write_json_atomic(args.out, to_optimum_report(load_result(args.result)))
    return 0


def cmd_lm_eval(args) -> int:
    try:
        import lm_eval
    except ImportError:
        raise BenchError("lm-eval: needs lm-evaluation-harness: pip install 'ds-bench[lmeval]'") from None
    from lm_eval.tasks import TaskManager

    from ds_bench.lm_eval_model import DsLM

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise BenchError(f"--model: {model_dir}: not a directory")
    lm = DsLM(path=str(model_dir), backend=args.backend, device=args.device)
    if args.only_include_path and not args.include_path:
        raise BenchError("--only-include-path: needs --include-path DIR")
    if args.include_path and not Path(args.include_path).is_dir():
        raise BenchError(f"--include-path: {args.include_path}: not a directory")
    tm = TaskManager(include_path=args.include_path, include_defaults=not args.only_include_path)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise BenchError(f"--tasks: unknown task {unknown[0]!r}")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=args.limit)
    summary = results["results"]
    print(json.dumps(summary, indent=1, default=str))
    if args.out:
        from ds_bench.result import write_json_atomic

        write_json_atomic(args.out, {"results": summary, "versions": results.get("versions", {})})
    return 0


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args, argv)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "export-optimum":
            return cmd_export_optimum(args)
        if args.command == "metrics":
            from ds_bench.metrics import metrics_table_markdown

            print(metrics_table_markdown())
            return 0
        if args.command == "lm-eval":
            return cmd_lm_eval(args)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ds-bench compare ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # a failed run: one line, the traceback only on request
        if os.environ.get("DS_BENCH_DEBUG"):
            raise
        print(
            f"{PROG}: error: {type(e).__name__}: {e} (set DS_BENCH_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
