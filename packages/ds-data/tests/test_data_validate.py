import json
import os
import tracemalloc

import pytest

from ds_data.record_io import write_jsonl
from ds_data.records import CODES
from ds_data.synthetic import sample_records
from ds_data.validate import validate_files


def _problems(paths, **kw):
    found = []
    summary = validate_files(paths, on_problem=found.append, **kw)
    return summary, found


def test_fixture_every_bad_record_has_its_code_and_path(fixtures_dir, expected_problems):
    path = os.path.join(fixtures_dir, "bad_records.jsonl")
    summary, found = _problems([path])
    bad_lines = [k for k, v in expected_problems.items() if v]
    assert len(bad_lines) >= 30
    got: dict[str, list] = {k: [] for k in expected_problems}
    for p in found:
        assert p.file == path
        got[str(p.line)].append({"code": p.code, "path": p.path})
    for line, want in expected_problems.items():
        assert sorted(got[line], key=lambda d: (d["path"], d["code"])) == want, f"line {line}"
    assert summary.records == len(expected_problems)
    assert summary.valid == len(expected_problems) - len(bad_lines)
    assert summary.invalid == len(bad_lines)
    assert all(p.code in CODES for p in found)
    # The fixture covers every record-level code (file-level codes are tested below; schema.invalid
    # is the fallback for a keyword the schema does not use).
    assert {p.code for p in found} == {c for c in CODES if not c.startswith("file.")} - {"schema.invalid"}


def test_rejects_are_the_bad_lines_unchanged(fixtures_dir, expected_problems, tmp_path):
    path = os.path.join(fixtures_dir, "bad_records.jsonl")
    rejects = tmp_path / "rejects.jsonl"
    validate_files([path], rejects=str(rejects))
    with open(path, "rb") as f:
        lines = f.readlines()
    want = [lines[int(k) - 1] for k, v in expected_problems.items() if v]
    assert rejects.read_bytes() == b"".join(want)
    # Re-validating the rejects finds only bad records (the duplicate-id one is valid on its own).
    summary = validate_files([str(rejects)])
    assert summary.valid == 1 and summary.invalid == len(want) - 1


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data, encoding="utf-8")
    return str(p)


VALID = json.dumps({"id": "v1", "domain": "energy", "text": "ok"})


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("empty.jsonl", b"", "file.empty"),
        ("blank.jsonl", b"\n  \n\n", "file.empty"),
        ("empty.json", b"  \n", "file.empty"),
        ("emptyarr.json", b"[ ]", "file.empty"),
        ("image.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "file.binary"),
        ("zipped.json", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(200), "file.binary"),
        ("records.csv", b"id,domain\n", "file.format"),
        ("fake.parquet", b"this is not parquet at all", "file.parquet"),
    ],
)
def test_file_level_codes(tmp_path, name, data, code):
    path = _write(tmp_path, name, data)
    summary, found = _problems([path])
    assert [(p.code, p.line, p.path) for p in found] == [(code, 0, "$")]
    assert summary.bad_files == 1 and not summary.ok


def test_missing_and_directory(tmp_path):
    summary, found = _problems([str(tmp_path / "nope.jsonl"), str(tmp_path)])
    assert [p.code for p in found] == ["file.missing", "file.unreadable"]
    assert summary.files == 2 and summary.bad_files == 2


def test_valid_records_around_bad_files_still_count(tmp_path):
    good = _write(tmp_path, "good.jsonl", VALID + "\n")
    summary, _found = _problems([str(tmp_path / "missing.jsonl"), good, _write(tmp_path, "e.jsonl", b"")])
    assert summary.valid == 1 and summary.bad_files == 2


def test_json_array_and_single_object_with_lines(tmp_path, sample_records):
    recs = sample_records[:3]
    bad = dict(recs[1], domain="nowhere")
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in [recs[0], bad, recs[2]]) + "\n]\n"
    path = _write(tmp_path, "arr.json", text)
    summary, found = _problems([path])
    assert summary.records == 3 and summary.valid == 2
    (p,) = found
    # The bad record starts on the line after the first record's closing brace.
    first_lines = json.dumps(recs[0], indent=2).count("\n") + 1
    assert (p.code, p.path, p.line) == ("schema.domain", "$.domain", 2 + first_lines)
    single = _write(tmp_path, "one.json", json.dumps(recs[0], indent=1))
    assert validate_files([single]).valid == 1


@pytest.mark.parametrize(
    ("text", "valid", "line"),
    [
        ('[{"id": "a", "domain": "legal", "text": "x"},\n {"id": "b", "domain": oops}]', 1, 2),
        ('[{"id": "a", "domain": "legal", "text": "x"}\n {"id": "b"}]', 1, 2),
        ('[{"id": "a", "domain": "legal", "text": "x"},\n', 1, 2),
        ('{"id": "a", "domain": "legal", "text": "x"}\n{"id": "b"}', 1, 2),
        ('[{"id": "a", "domain": "legal", "text": "x"}] extra', 1, 1),
    ],
)
def test_json_file_malformed_after_valid_records(tmp_path, text, valid, line):
    summary, found = _problems([_write(tmp_path, "m.json", text)])
    assert summary.valid == valid
    assert [(p.code, p.line) for p in found] == [("json.malformed", line)]


def test_large_json_array_streams_across_chunks(tmp_path):
    # Records straddle the 1 MiB read window many times; every one must come through intact.
    recs = list(sample_records(6000, seed=3))
    path = tmp_path / "big.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    assert path.stat().st_size > 3 << 20
    summary, found = _problems([str(path)])
    assert found == [] and summary.valid == 6000


def test_parquet_rows_are_validated(tmp_path, sample_records):
    import datasets

    rows = [dict(r) for r in sample_records[:5]]
    rows[3]["domain"] = "space"
    ds = datasets.Dataset.from_list(rows)
    path = str(tmp_path / "r.parquet")
    ds.to_parquet(path)
    summary, found = _problems([path])
    assert summary.valid == 4 and [(p.line, p.code) for p in found] == [(4, "schema.domain")]


@pytest.mark.parametrize("ext", [".jsonl", ".json"])
def test_streaming_uses_constant_memory(tmp_path, ext):
    # 400 records of ~25 KB each: a 10 MB file, validated holding about one record at a time.
    long_text = "The quick brown fox jumps over the lazy dog. " * 550
    recs = ({"id": f"r{i}", "domain": "retail", "text": long_text + str(i)} for i in range(400))
    path = str(tmp_path / f"many{ext}")
    if ext == ".jsonl":
        write_jsonl(recs, path)
    else:
        with open(path, "w") as f:
            json.dump(list(recs), f)
    size = os.path.getsize(path)
    assert size > 9_000_000
    tracemalloc.start()
    summary = validate_files([path])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert summary.valid == 400
    assert peak < 4_000_000, (peak, size)  # the JSON reader's window is 1 MiB (+ one record, decoded)


def test_cli_validate_exit_codes_and_json(run_cli, fixtures_dir, tmp_path):
    good = _write(tmp_path, "good.jsonl", VALID + "\n")
    code, out, err = run_cli("validate", good)
    assert code == 0 and "valid" in out and err == ""
    code, out, err = run_cli("validate", os.path.join(fixtures_dir, "bad_records.jsonl"), "--format", "json")
    assert code == 2
    lines = [json.loads(x) for x in out.splitlines()]
    summary = lines[-1]["summary"]
    assert summary["invalid"] == 43 and summary["valid"] == 4 and summary["ok"] is False
    assert {"file", "line", "path", "code", "message"} <= set(lines[0])
    code, out, _ = run_cli("validate", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl: $: file.missing" in out
    code, out, _ = run_cli("validate", os.path.join(fixtures_dir, "bad_records.jsonl"), "--max-errors", "3")
    assert code == 2 and "more problems not shown" in out
    assert sum(1 for x in out.splitlines() if "bad_records.jsonl:" in x) == 3


def test_parallel_workers_report_exactly_what_serial_does(tmp_path, fixtures_dir, monkeypatch):
    import ds_data.validate as v

    monkeypatch.setattr(v, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(v, "CHUNK_LINES", 50)  # many chunks, so the in-flight window turns over
    used = []
    real = v._checked_parallel
    monkeypatch.setattr(v, "_checked_parallel", lambda *a: used.append(a) or real(*a))
    with open(os.path.join(fixtures_dir, "bad_records.jsonl"), "rb") as f:
        bad_lines = f.read().splitlines(keepends=True)
    good = list(sample_records(1500, seed=9))
    path = tmp_path / "mixed.jsonl"
    with open(path, "wb") as f:
        for i, rec in enumerate(good):
            f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
            if i % 40 == 0:
                f.write(bad_lines[(i // 40) % len(bad_lines)])
                f.write(b"\n")  # blank lines keep their line numbers
    runs = {}
    for workers in (1, 2):
        found = []
        summary = validate_files(
            [str(path)],
            workers=workers,
            on_problem=found.append,
            rejects=str(tmp_path / f"rej{workers}.jsonl"),
        )
        runs[workers] = (summary.to_dict(), found, (tmp_path / f"rej{workers}.jsonl").read_bytes())
    assert len(used) == 1  # workers=2 took the multi-process path, workers=1 did not
    assert runs[1] == runs[2]
    assert runs[1][0]["invalid"] > 30 and runs[1][0]["valid"] >= 1500
