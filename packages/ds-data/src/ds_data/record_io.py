"""Reading and writing record files (JSONL, JSON, Parquet) as streams.

Readers never hold more than one record (JSONL, JSON) or one row group batch (Parquet) in memory and
never raise for bad input: every problem comes out as an :class:`Item` carrying an :class:`Issue`, so a
caller can report it and go on with the next record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ds_data.atomic import AtomicFile
from ds_data.records import Issue, from_row

EXTENSIONS = (".jsonl", ".json", ".parquet")
_HEAD = 8192
_CHUNK = 1 << 20
_MAX_RECORD = 64 << 20  # a single JSON record larger than this is surely not a record


@dataclass(slots=True)
class Item:
    """One record slot of a file: ``line`` is the 1-based line (JSONL, JSON) or row (Parquet), 0 for the
    whole file; ``raw`` the record's original bytes (kept for ``--rejects``); ``record`` the decoded value
    or None; ``issue`` a problem found while reading, or None."""

    line: int
    raw: bytes | None
    record: Any
    issue: Issue | None = None


def _file_issue(code: str, message: str) -> Item:
    return Item(0, None, None, Issue("$", code, message))


def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    # Control bytes other than whitespace are rare in text and common in compressed or image data.
    controls = sum(1 for b in head if b < 0x20 and b not in (0x09, 0x0A, 0x0C, 0x0D))
    return controls > 0.05 * len(head)


def file_problem(path: str) -> Item | None:
    """A problem with the whole file, found before reading any record; None when it looks readable."""
    if not os.path.exists(path):
        return _file_issue("file.missing", "no such file")
    if os.path.isdir(path) or not os.access(path, os.R_OK):
        return _file_issue("file.unreadable", "is a directory or cannot be read")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        return _file_issue(
            "file.format", f"unsupported extension {ext or '(none)'!r}; expected {', '.join(EXTENSIONS)}"
        )
    if os.path.getsize(path) == 0:
        return _file_issue("file.empty", "the file is empty")
    if ext != ".parquet":
        with open(path, "rb") as f:
            if _looks_binary(f.read(_HEAD)):
                return _file_issue("file.binary", "binary content; expected UTF-8 JSON text")
    return None


def iter_items(path: str) -> Iterator[Item]:
    """Stream the records of one file, whatever its format; problems come out as items with an issue."""
    bad = file_problem(path)
    if bad is not None:
        yield bad
        return
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        yield from _iter_parquet(path)
        return
    with open(path, "rb") as f:
        if ext == ".jsonl":
            yield from _iter_jsonl(f)
            return
        try:
            yield from _iter_json(f)
        except UnicodeDecodeError as exc:
            yield _file_issue("json.encoding", f"invalid UTF-8 ({exc.reason})")


def decode_line(lineno: int, line: bytes) -> Item:
    """One JSONL line to an item: the decoded value, or the reason it cannot be decoded."""
    try:
        return Item(lineno, line, json.loads(line))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return _decode_error(lineno, line, exc)


def _decode_error(lineno: int, raw: bytes, exc: ValueError) -> Item:
    if isinstance(exc, UnicodeDecodeError):
        return Item(lineno, raw, None, Issue("$", "json.encoding", f"invalid UTF-8 at byte {exc.start + 1}"))
    try:  # again without the line end, so an error at the end reports this line's column
        json.loads(raw.rstrip(b"\r\n"))
    except json.JSONDecodeError as again:
        exc = again
    msg = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
    return Item(lineno, raw, None, Issue("$", "json.malformed", msg))


def jsonl_lines(f) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of the non-blank lines: blank lines separate nothing and are not records."""
    for lineno, line in enumerate(f, 1):
        if not line.isspace():
            yield lineno, line


def _iter_jsonl(f) -> Iterator[Item]:
    seen = False
    for lineno, line in jsonl_lines(f):
        seen = True
        yield decode_line(lineno, line)
    if not seen:
        yield _file_issue("file.empty", "only blank lines")


def _iter_json(f) -> Iterator[Item]:
    """A JSON file is one record object or an array of them; the array is decoded one element at a
    time with ``raw_decode`` over a sliding buffer, so memory stays at one record."""
    dec = json.JSONDecoder()
    reader = _TextChunks(f)
    pos = reader.skip_ws(0)
    if reader.eof_at(pos):
        yield _file_issue("file.empty", "only whitespace")
        return
    if reader.buf[pos] == "[":
        is_array, pos = True, reader.skip_ws(pos + 1)
        if not reader.eof_at(pos) and reader.buf[pos] == "]":
            yield _file_issue("file.empty", "an empty array")
            return
    else:
        is_array = False
    while True:
        line = reader.line_at(pos)
        try:
            value, end = reader.decode(dec, pos)
        except json.JSONDecodeError as exc:
            yield Item(reader.line_at(exc.pos), None, None, Issue("$", "json.malformed", exc.msg))
            return  # no resynchronising inside one JSON document
        text = reader.buf[pos:end]
        # Kept verbatim for --rejects when it is one line; a multi-line record is re-serialised.
        yield Item(line, text.encode("utf-8") if "\n" not in text else None, value)
        pos = reader.skip_ws(end)
        if not is_array:
            if not reader.eof_at(pos):
                yield Item(
                    reader.line_at(pos),
                    None,
                    None,
                    Issue("$", "json.malformed", "extra data after the record"),
                )
            return
        if reader.eof_at(pos):
            yield Item(
                reader.line_at(pos), None, None, Issue("$", "json.malformed", "the array is not closed")
            )
            return
        sep = reader.buf[pos]
        if sep == "]":
            if not reader.eof_at(reader.skip_ws(pos + 1)):
                yield Item(
                    reader.line_at(pos), None, None, Issue("$", "json.malformed", "extra data after ']'")
                )
            return
        if sep != ",":
            yield Item(reader.line_at(pos), None, None, Issue("$", "json.malformed", "expected ',' or ']'"))
            return
        pos = reader.skip_ws(pos + 1)
        reader.compact(pos)
        pos = reader.skip_ws(0)


class _TextChunks:
    """A growable window over a UTF-8 text file, with line counting for positions in the window."""

    def __init__(self, f):
        import codecs

        self._f = f
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self._eof = False
        self._lines_before = 1  # line number of buf[0]

    def _more(self) -> bool:
        if self._eof:
            return False
        data = self._f.read(_CHUNK)
        self._eof = not data
        self.buf += self._decoder.decode(data, final=self._eof)
        return True

    def eof_at(self, pos: int) -> bool:
        while pos >= len(self.buf):
            if not self._more():
                return True
        return False

    def skip_ws(self, pos: int) -> int:
        while not self.eof_at(pos) and self.buf[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_at(self, pos: int) -> int:
        return self._lines_before + self.buf.count("\n", 0, pos)

    def compact(self, pos: int) -> None:
        self._lines_before += self.buf.count("\n", 0, pos)
        self.buf = self.buf[pos:]

    def decode(self, dec: json.JSONDecoder, pos: int) -> tuple[Any, int]:
        while True:
            try:
                value, end = dec.raw_decode(self.buf, pos)
            except json.JSONDecodeError as exc:
                # Incomplete input fails at the end of the window (or inside an unterminated string):
                # read more and retry; anything else is malformed.
                incomplete = exc.pos >= len(self.buf) - 1 or exc.msg.startswith("Unterminated string")
                if incomplete and len(self.buf) - pos < _MAX_RECORD and self._more():
                    continue
                raise
            # A number at the window's end may continue in the next chunk.
            if end < len(self.buf) or not self._more():
                return value, end


def _iter_parquet(path: str) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield _file_issue("file.parquet", f"not a Parquet file ({exc})")
        return
    if pf.metadata.num_rows == 0:
        yield _file_issue("file.empty", "no rows")
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                rec = from_row(rec)
                yield Item(row, None, rec)
    except (pa.ArrowException, OSError) as exc:
        yield Item(row + 1, None, None, Issue("$", "file.parquet", f"unreadable row group ({exc})"))


# ---------------------------------------------------------------------------------------------------
# Writing.


def dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False)


def write_jsonl(records: Iterable[dict], path: str) -> int:
    """Write records as JSON Lines (UTF-8, not ASCII-escaped), atomically; returns the count."""
    n = 0
    with AtomicFile(path) as f:
        for rec in records:
            f.write(dumps(rec) + "\n")
            n += 1
    return n
