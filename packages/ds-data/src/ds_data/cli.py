"""The ``ds-data`` command line. Exit codes: 0 ok, 1 failed, 2 bad input (one line on stderr)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ds_data.__about__ import __version__
from ds_data.errors import DsDataError

PROG = "ds-data"


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


# ---------------------------------------------------------------------------------------------------
# validate


def cmd_validate(args: argparse.Namespace) -> int:
    from ds_data.validate import default_workers, validate_files

    out = sys.stdout
    shown = 0

    def on_problem(p) -> None:
        nonlocal shown
        shown += 1
        if args.max_errors and shown > args.max_errors:
            return
        out.write((json.dumps(p.to_dict(), ensure_ascii=False) if args.format == "json" else str(p)) + "\n")

    err = Console(stderr=True)
    with _progress(err) as progress:
        task = progress.add_task("validating", total=len(args.paths))
        summary = validate_files(
            args.paths,
            rejects=args.rejects,
            on_problem=on_problem,
            on_file=lambda path: progress.update(task, advance=1, description=f"validating {path}"),
            workers=args.workers or default_workers(),  # 0: one per CPU
        )
    if args.format == "json":
        out.write(json.dumps({"summary": summary.to_dict()}) + "\n")
    else:
        if args.max_errors and shown > args.max_errors:
            out.write(
                f"... {shown - args.max_errors} more problems not shown (--max-errors {args.max_errors})\n"
            )
        console = Console(file=out, width=100)
        table = Table(title="validation summary", title_justify="left", show_header=False)
        table.add_column("what")
        table.add_column("count", justify="right")
        for name in ("files", "bad_files", "records", "valid", "invalid"):
            table.add_row(name.replace("_", " "), str(getattr(summary, name)))
        for code, n in sorted(summary.codes.items()):
            table.add_row(f"  {code}", str(n))
        console.print(table)
        if args.rejects:
            console.print(f"bad records written to {args.rejects}")
    return 0 if summary.ok else 2


# ---------------------------------------------------------------------------------------------------
# stats


def _valid_records(paths: list[str], counts: dict) -> Iterator[dict]:
    from ds_data.record_io import iter_items
    from ds_data.records import check_record

    for path in paths:
        for item in iter_items(path):
            if item.line == 0:
                raise DsDataError(f"{path}: {item.issue.code}: {item.issue.message}")
            if item.issue is None and not check_record(item.record):
                yield item.record
            else:
                counts["invalid"] += 1


def cmd_stats(args: argparse.Namespace) -> int:
    from ds_data.stats import compute_stats, print_stats
    from ds_data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    counts = {"invalid": 0}
    stats = compute_stats(_valid_records(args.paths, counts), tokenizer)
    if args.format == "json":
        print(json.dumps({**stats.to_dict(), "invalid": counts["invalid"]}, ensure_ascii=False, indent=2))
    else:
        print_stats(
            stats, Console(), token_unit="tokens" if tokenizer else "words", invalid=counts["invalid"]
        )
    return 0


# ---------------------------------------------------------------------------------------------------
# sample / convert


def _write_records(records, out: str | None) -> int:
    from ds_data.atomic import AtomicFile
    from ds_data.loading import records_to_dataset, write_parquet
    from ds_data.record_io import dumps, write_jsonl

    if out is None:
        n = 0
        for rec in records:
            sys.stdout.write(dumps(rec) + "\n")
            n += 1
        return n
    ext = os.path.splitext(out)[1].lower()
    if ext == ".jsonl":
        return write_jsonl(records, out)
    if ext == ".json":
        records = list(records)
        with AtomicFile(out) as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
        return len(records)
    if ext == ".parquet":
        ds = records_to_dataset(records)
        write_parquet(ds, out)
        return ds.num_rows
    raise DsDataError(f"--out: {out}: expected a .jsonl, .json or .parquet file")


def cmd_sample(args: argparse.Namespace) -> int:
    from ds_data.synthetic import sample_records

    if args.n < 1:
        raise DsDataError(f"--n: expected a positive integer, got {args.n}")
    n = _write_records(sample_records(args.n, seed=args.seed), args.out)
    if args.out:
        print(f"wrote {n} synthetic records to {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ds_data.loading import dataset_records, load_records

    ds = load_records(args.inputs, streaming=True)
    n = _write_records(dataset_records(ds), args.out)
    print(f"wrote {n} records to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# tokenizer / pack


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from ds_data.corpus import load_corpus
    from ds_data.tokenizer import tokenizer_path, train_tokenizer

    corpus = load_corpus(args.inputs or "builtin")
    tok = train_tokenizer(
        corpus["train"],
        args.vocab_size,
        args.out,
        min_frequency=args.min_frequency,
        show_progress=sys.stderr.isatty(),
    )
    print(f"wrote {tokenizer_path(args.out)} (vocab {tok.get_vocab_size()})")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from ds_data.corpus import load_corpus
    from ds_data.packing import fingerprint, pack
    from ds_data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    corpus = load_corpus(args.inputs or "builtin")
    info = {}
    for split in ("train", "validation"):
        packed = pack(corpus[split], tokenizer, args.seq_len, num_proc=args.num_proc)
        packed.save_to_disk(os.path.join(args.out, split))
        info[split] = {
            "rows": packed.num_rows,
            "source_fingerprint": fingerprint(corpus[split]),
            "fingerprint": fingerprint(packed),
        }
    print(json.dumps(info, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------
# labelstudio


def _read_json(path: str):
    if not os.path.isfile(path):
        raise DsDataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DsDataError(f"{path}: not a JSON file ({exc})") from None


def cmd_ls_export(args: argparse.Namespace) -> int:
    from ds_data.atomic import AtomicFile
    from ds_data.labelstudio import export_tasks, labelling_config
    from ds_data.loading import dataset_records, load_records

    records = list(dataset_records(load_records(args.inputs, streaming=True)))
    tasks = export_tasks(records, offsets=args.offsets)
    with AtomicFile(args.out) as f:
        json.dump(tasks, f, ensure_ascii=False, indent=1)
    msg = f"wrote {len(tasks)} Label Studio tasks to {args.out}"
    if args.config:
        with AtomicFile(args.config) as f:
            f.write(labelling_config(records) + "\n")
        msg += f" and the labelling config to {args.config}"
    print(msg)
    return 0


def cmd_ls_import(args: argparse.Namespace) -> int:
    from ds_data.atomic import AtomicFile
    from ds_data.labelstudio import from_task
    from ds_data.record_io import dumps, write_jsonl

    tasks = _read_json(args.input)
    if not isinstance(tasks, list):
        tasks = [tasks]
    records, bad = [], []
    for i, task in enumerate(tasks):
        try:
            records.append(from_task(task, offsets=args.offsets))
        except DsDataError as exc:
            print(f"{args.input}: [{i}]: {exc}", file=sys.stderr)
            bad.append(task)
    write_jsonl(records, args.out)
    if args.rejects:
        with AtomicFile(args.rejects) as f:
            f.writelines(dumps(t) + "\n" for t in bad)
    print(f"wrote {len(records)} records to {args.out}" + (f"; {len(bad)} tasks rejected" if bad else ""))
    return 2 if bad else 0


def cmd_ls_config(args: argparse.Namespace) -> int:
    from ds_data.atomic import AtomicFile
    from ds_data.labelstudio import labelling_config

    xml = labelling_config()
    if args.out:
        with AtomicFile(args.out) as f:
            f.write(xml + "\n")
    else:
        print(xml)
    return 0


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, description="ds labelled records, corpora, tokenizers.", formatter_class=fmt
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check record files against the schema", formatter_class=fmt)
    p.add_argument("paths", nargs="+", metavar="PATH", help=".jsonl, .json or .parquet record files")
    p.add_argument("--rejects", metavar="FILE", help="write bad records here unchanged (JSON Lines)")
    p.add_argument("--format", choices=["text", "json"], default="text", help="problem output format")
    p.add_argument("--max-errors", type=int, default=0, help="print at most this many problems (0: all)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes for JSONL files >= 4 MB (0: one per CPU, at most 4); pays off on idle cores only",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("stats", help="counts per domain and label, token lengths", formatter_class=fmt)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or its directory) for token lengths")
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "sample", help="synthetic schema-valid records in all twelve domains", formatter_class=fmt
    )
    p.add_argument("--n", type=int, default=24, help="number of records")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same records")
    p.add_argument("--out", metavar="FILE", help=".jsonl, .json or .parquet (default: JSON Lines on stdout)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "convert", help="convert record files between JSONL, JSON and Parquet", formatter_class=fmt
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, metavar="FILE", help=".jsonl, .json or .parquet")
    p.set_defaults(func=cmd_convert)

    tok = sub.add_parser("tokenizer", help="tokenizer commands", formatter_class=fmt)
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tsub.add_parser("train", help="train a byte-level BPE tokenizer", formatter_class=fmt)
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help=".txt/.jsonl files (default: the built-in corpus)"
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--out", default="tokenizer.json", help="tokenizer.json path or a directory")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser(
        "pack", help="tokenize and pack a corpus into fixed-length blocks", formatter_class=fmt
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help=".txt/.jsonl files (default: the built-in corpus)"
    )
    p.add_argument("--tokenizer", required=True, metavar="PATH")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--num-proc", type=int, default=1, help="datasets.map worker processes")
    p.add_argument("--out", required=True, metavar="DIR", help="datasets.save_to_disk directory")
    p.set_defaults(func=cmd_pack)

    ls = sub.add_parser("labelstudio", help="Label Studio import/export", formatter_class=fmt)
    lsub = ls.add_subparsers(dest="labelstudio_command", required=True)
    p = lsub.add_parser("export", help="ds records -> Label Studio tasks JSON", formatter_class=fmt)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--config", metavar="FILE", help="also write the labelling-config XML here")
    p.add_argument(
        "--offsets",
        choices=["utf16", "codepoint"],
        default="utf16",
        help="Label Studio offset unit (its web UI uses UTF-16 code units)",
    )
    p.set_defaults(func=cmd_ls_export)
    p = lsub.add_parser("import", help="Label Studio export JSON -> ds records JSONL", formatter_class=fmt)
    p.add_argument("input", metavar="TASKS_JSON")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--rejects", metavar="FILE", help="write tasks that cannot be converted here")
    p.add_argument(
        "--offsets", choices=["utf16", "codepoint"], default="utf16", help="offset unit of the tasks"
    )
    p.set_defaults(func=cmd_ls_import)
    p = lsub.add_parser("config", help="print the labelling-config XML", formatter_class=fmt)
    p.add_argument("--out", metavar="FILE")
    p.set_defaults(func=cmd_ls_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DsDataError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, not a traceback; DS_DEBUG=1 shows it
        if os.environ.get("DS_DEBUG"):
            raise
        print(f"{PROG}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
