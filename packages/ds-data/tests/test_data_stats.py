import json

import ds_data

RECS = [
    {
        "id": "a",
        "domain": "finance",
        "text": "one two three",
        "labels": ["x", "y"],
        "annotations": {
            "entity_recognition": [
                {"id": "e", "start": 0, "end": 3, "label": "NUM", "text": "one"},
                {"id": "f", "start": 4, "end": 7, "label": "NUM", "text": "two"},
            ],
            "relation_extraction": [{"head": "e", "tail": "f", "label": "next"}],
        },
    },
    {"id": "b", "domain": "finance", "text": "four five", "labels": ["x"]},
    {"id": "c", "domain": "legal", "text": "six", "metadata": {"synthetic": True}},
]


def test_compute_stats_counts():
    s = ds_data.compute_stats(RECS).to_dict()
    assert s["records"] == 3 and s["synthetic"] == 1
    assert s["domains"] == {"finance": 2, "legal": 1}
    assert s["labels"] == {"x": 2, "y": 1}
    assert s["entity_labels"] == {"NUM": 2} and s["relation_labels"] == {"next": 1}
    assert (s["entities"], s["relations"]) == (2, 1)
    assert s["token_lengths"] == {"min": 1, "mean": 2.0, "p50": 2, "p95": 3, "max": 3, "total": 6}


def test_stats_with_a_tokenizer(small_tokenizer):
    s = ds_data.compute_stats(RECS, small_tokenizer).to_dict()
    want = sorted(len(small_tokenizer.encode(r["text"]).ids) for r in RECS)
    assert (s["token_lengths"]["min"], s["token_lengths"]["max"]) == (want[0], want[-1])


def test_cli_stats_table_and_json(run_cli, tmp_path):
    p = tmp_path / "r.jsonl"
    ds_data.write_jsonl(RECS, str(p))
    with open(p, "a") as f:
        f.write('{"id": "bad", "domain": "nowhere", "text": "x"}\n')
    code, out, _ = run_cli("stats", p)
    assert code == 0
    assert "records per domain" in out and "finance" in out and "invalid records (skipped)" in out
    code, out, _ = run_cli("stats", p, "--format", "json")
    d = json.loads(out)
    assert d["records"] == 3 and d["invalid"] == 1 and d["domains"]["legal"] == 1
