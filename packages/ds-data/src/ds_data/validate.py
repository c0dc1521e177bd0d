"""``ds-data validate``: stream record files, report every problem with file, line, JSON path and code.

Memory is constant in the size of the files (one record at a time) except for the set of record ids
seen, which is needed to report duplicate ids across files and is kept as 8-byte hashes.
Throughput comes from the compiled validator in :mod:`ds_data.records`; the reference validator only
runs on the records that fail, to explain why.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ds_data.atomic import AtomicFile
from ds_data.record_io import Item, decode_line, dumps, file_problem, iter_items, jsonl_lines
from ds_data.records import Issue, check_record


@dataclass(frozen=True)
class Problem:
    """An :class:`Issue` located in a file: ``line`` is 1-based (0 means the whole file)."""

    file: str
    line: int
    path: str
    code: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.code}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Summary:
    files: int = 0
    bad_files: int = 0
    records: int = 0
    valid: int = 0
    invalid: int = 0
    codes: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.invalid == 0 and self.bad_files == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["codes"] = dict(sorted(self.codes.items()))
        d["ok"] = self.ok
        return d


# One checked record: (line, issues, record id or None, what --rejects writes if it is bad: the
# original bytes, or the decoded record when there are no one-line bytes, or None).
Checked = tuple[int, list[Issue], "str | None", Any]

PARALLEL_MIN_BYTES = 4 << 20  # below this, starting worker processes costs more than it saves
CHUNK_LINES = 2000


def _check_item(item: Item) -> tuple[int, list[Issue], str | None]:
    if item.issue is not None:
        return item.line, [item.issue], None
    rid = item.record.get("id") if isinstance(item.record, dict) else None
    return item.line, check_record(item.record), rid if isinstance(rid, str) else None


def check_lines(chunk: list[tuple[int, bytes]]) -> list[tuple[int, list[Issue], str | None]]:
    """Decode and check a chunk of JSONL lines (runs in a worker process)."""
    return [_check_item(decode_line(lineno, line)) for lineno, line in chunk]


def _checked_serial(path: str) -> Iterator[Checked]:
    for item in iter_items(path):
        yield (*_check_item(item), item.raw if item.raw is not None else item.record)


def _checked_parallel(path: str, pool) -> Iterator[Checked]:
    """JSONL checked by worker processes, results in file order. At most 2 chunks per worker are in
    flight (not Pool.imap, whose feeder thread would read the whole file ahead): memory stays bounded.
    The parent keeps each chunk's lines, so workers send back only the verdicts."""
    bad = file_problem(path)
    if bad is not None:
        yield (*_check_item(bad), None)
        return
    window = 2 * pool._processes
    pending: deque = deque()

    def drain() -> Iterator[Checked]:
        chunk, result = pending.popleft()
        for (line, issues, rid), (_, raw) in zip(result.get(), chunk):
            yield line, issues, rid, raw

    seen = False
    with open(path, "rb") as f:
        lines = jsonl_lines(f)
        while chunk := list(itertools.islice(lines, CHUNK_LINES)):
            seen = True
            pending.append((chunk, pool.apply_async(check_lines, (chunk,))))
            if len(pending) >= window:
                yield from drain()
    while pending:
        yield from drain()
    if not seen:
        yield 0, [Issue("$", "file.empty", "only blank lines")], None, None


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def validate_files(
    paths: Iterable[str],
    *,
    rejects: str | None = None,
    on_problem: Callable[[Problem], None] | None = None,
    on_file: Callable[[str], None] | None = None,
    workers: int = 1,
) -> Summary:
    """Validate record files; call ``on_problem`` for every problem; return the counts.

    With ``rejects``, every bad record is written there unchanged (its original line for JSONL, its
    JSON text for JSON and Parquet rows), one per line, so nothing is silently dropped. With
    ``workers > 1``, large JSONL files are decoded and checked in that many processes; the report
    is identical (same order, same problems).
    """
    summary = Summary()
    seen_ids: set[int] = set()
    report = on_problem or (lambda p: None)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(AtomicFile(rejects, "wb")) if rejects else None
        pool = None
        for path in paths:
            summary.files += 1
            if on_file:
                on_file(path)
            parallel = (
                workers > 1
                and path.lower().endswith(".jsonl")
                and os.path.isfile(path)
                and os.path.getsize(path) >= PARALLEL_MIN_BYTES
            )
            if parallel and pool is None:
                pool = stack.enter_context(multiprocessing.Pool(workers))
            for line, issues, rid, reject in (
                _checked_parallel(path, pool) if parallel else _checked_serial(path)
            ):
                if line == 0:  # the whole file is unusable
                    summary.bad_files += 1
                    summary.codes[issues[0].code] += 1
                    report(Problem(path, 0, issues[0].path, issues[0].code, issues[0].message))
                    continue
                summary.records += 1
                if rid is not None:
                    h = hash(rid)
                    if h in seen_ids:
                        issues = [
                            *issues,
                            Issue("$.id", "record.duplicate_id", f"id {rid!r} was seen before"),
                        ]
                    seen_ids.add(h)
                if not issues:
                    summary.valid += 1
                    continue
                summary.invalid += 1
                for issue in issues:
                    summary.codes[issue.code] += 1
                    report(Problem(path, line, issue.path, issue.code, issue.message))
                if out is not None and reject is not None:
                    out.write(_reject_line(reject))
    return summary


def _reject_line(raw: Any) -> bytes:
    """A bad record as one line: its original bytes where they are one line (JSONL), else its JSON."""
    if not isinstance(raw, bytes):
        raw = dumps(raw).encode("utf-8")
    return raw if raw.endswith(b"\n") else raw + b"\n"
