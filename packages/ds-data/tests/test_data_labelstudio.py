import json
import xml.etree.ElementTree as ET

import pytest

import ds_data
from ds_data.labelstudio import (
    export_tasks,
    from_task,
    import_tasks,
    labelling_config,
    to_task,
    utf16_offsets,
)
from ds_data.records import DOMAINS, ENTITY_LABELS, RELATION_LABELS

AWKWARD = [
    {
        "id": "emoji",
        "domain": "retail",
        "text": "😀 Ann 👍🏽 bought 🇺🇸 flags",
        "annotations": {
            "entity_recognition": [
                {"id": "e1", "start": 2, "end": 5, "label": "PERSON", "text": "Ann"},
                {"id": "e2", "start": 6, "end": 8, "label": "EMOJI", "text": "👍🏽"},
                {"id": "e3", "start": 16, "end": 18, "label": "FLAG", "text": "🇺🇸"},
            ],
            "relation_extraction": [{"id": "r1", "head": "e1", "tail": "e3", "label": "bought"}],
        },
    },
    {
        "id": "crlf",
        "domain": "legal",
        "text": "Line one\r\nBob signed\r\n\r\nthe deed.",
        "labels": ["contract"],
        "annotations": {
            "entity_recognition": [{"id": "b", "start": 10, "end": 13, "label": "PERSON", "text": "Bob"}]
        },
    },
    {
        "id": "cjk_rtl",
        "domain": "government",
        "text": "東京都庁 وزارة المالية ministry",
        "annotations": {
            "entity_recognition": [
                {"id": "t", "start": 0, "end": 4, "label": "ORGANIZATION", "text": "東京都庁"},
                {"id": "m", "start": 5, "end": 18, "label": "ORGANIZATION", "text": "وزارة المالية"},
            ],
            "relation_extraction": [],
        },
        "metadata": {"language": "ja", "annotator": "x"},
    },
    {"id": "plain", "domain": "energy", "text": "no annotations at all"},
]


def test_utf16_offsets():
    text = "a😀b👍🏽c"
    # 😀 and 👍 are outside the BMP (two UTF-16 units); the skin-tone modifier 🏽 is too.
    assert utf16_offsets(text) == [0, 1, 3, 4, 6, 8, 9]
    assert utf16_offsets("a\r\nb") == [0, 1, 2, 3, 4]
    assert utf16_offsets("東京") == [0, 1, 2]


def test_export_uses_utf16_offsets_that_match_javascript_slicing():
    task = to_task(AWKWARD[0])
    text16 = AWKWARD[0]["text"].encode("utf-16-le")
    spans = [r for r in task["annotations"][0]["result"] if r["type"] == "labels"]
    for r in spans:
        v = r["value"]
        # What JavaScript's text.slice(start, end) returns:
        assert text16[2 * v["start"] : 2 * v["end"]].decode("utf-16-le") == v["text"]
    assert [r["value"]["start"] for r in spans] == [3, 7, 19]  # +1 per astral character before the span
    rel = next(r for r in task["annotations"][0]["result"] if r["type"] == "relation")
    assert (rel["from_id"], rel["to_id"], rel["labels"]) == ("e1", "e3", ["bought"])


@pytest.mark.parametrize("offsets", ["utf16", "codepoint"])
def test_round_trip_records_tasks_records(sample_records, offsets):
    recs = sample_records + AWKWARD
    tasks = export_tasks(recs, offsets=offsets)
    # Through JSON text, as a file would go.
    tasks = json.loads(json.dumps(tasks, ensure_ascii=False))
    assert import_tasks(tasks, offsets=offsets) == recs


def test_import_takes_latest_non_cancelled_annotation_and_left_relations():
    task = to_task(AWKWARD[0])
    result = task["annotations"][0]["result"]
    older = {"result": [], "updated_at": "2024-01-01T00:00:00Z"}
    cancelled = {"result": [], "was_cancelled": True, "updated_at": "2030-01-01T00:00:00Z"}
    flipped = [
        dict(r, direction="left", from_id=r["to_id"], to_id=r["from_id"]) if r["type"] == "relation" else r
        for r in result
    ]
    task["annotations"] = [older, {"result": flipped, "updated_at": "2025-01-01T00:00:00Z"}, cancelled]
    assert from_task(task) == AWKWARD[0]


def test_foreign_task_without_ds_fields():
    text = "Zoë met 😀 Omar"
    task = {
        "id": 17,
        "data": {"text": text, "domain": "education"},
        "annotations": [
            {
                "result": [
                    {
                        "id": "x1",
                        "type": "labels",
                        "value": {"start": 0, "end": 3, "text": "Zoë", "labels": ["PERSON"]},
                    },
                    {"id": "x2", "type": "labels", "value": {"start": 11, "end": 15, "labels": ["PERSON"]}},
                    {"type": "relation", "from_id": "x1", "to_id": "x2", "direction": "right", "labels": []},
                ]
            }
        ],
    }
    rec = from_task(task)
    assert rec["id"] == "ls_17"
    assert rec["annotations"]["entity_recognition"][1]["text"] == "Omar"
    assert rec["annotations"]["relation_extraction"] == [{"head": "x1", "tail": "x2", "label": "related"}]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"start": 1, "end": 3, "labels": ["X"]}, "not a character boundary"),  # splits the surrogate pair
        ({"start": 3, "end": 6, "text": "Omar", "labels": ["X"]}, "differs from the text"),
        ({"start": 0, "end": 1, "labels": ["X", "Y"]}, "exactly one label"),
        ({"start": 0, "end": 99, "labels": ["X"]}, "not a character boundary"),
    ],
)
def test_bad_offsets_are_errors_not_shifts(value, match):
    task = {
        "data": {"text": "😀 Omar", "domain": "retail", "ds_id": "t"},
        "annotations": [{"result": [{"id": "a", "type": "labels", "value": value}]}],
    }
    with pytest.raises(ds_data.DsDataError, match=match):
        from_task(task)


def test_import_checks_the_record_against_the_schema():
    task = {"data": {"text": "x", "domain": "mars", "ds_id": "t"}}
    with pytest.raises(ds_data.DsDataError, match=r"\$.domain: schema.domain"):
        from_task(task)


def test_labelling_config_is_derived_from_the_schema():
    root = ET.fromstring(labelling_config([AWKWARD[0]]))
    labels = [e.get("value") for e in root.find("Labels")]
    assert labels[: len(ENTITY_LABELS)] == list(ENTITY_LABELS) and "EMOJI" in labels and "FLAG" in labels
    assert [e.get("value") for e in root.find("Relations")] == [*RELATION_LABELS, "bought"]
    choices = root.find("Choices")
    assert choices.get("name") == "domain" and [e.get("value") for e in choices] == list(DOMAINS)
    assert root.find("Text").get("value") == "$text"


def test_cli_export_import(run_cli, tmp_path, sample_records):
    src = tmp_path / "r.jsonl"
    ds_data.write_jsonl(sample_records + AWKWARD, str(src))
    code, out, _ = run_cli(
        "labelstudio", "export", src, "--out", tmp_path / "t.json", "--config", tmp_path / "c.xml"
    )
    assert code == 0 and "wrote 52 Label Studio tasks" in out
    ET.parse(tmp_path / "c.xml")
    code, out, _ = run_cli("labelstudio", "import", tmp_path / "t.json", "--out", tmp_path / "back.jsonl")
    assert code == 0
    assert (tmp_path / "back.jsonl").read_bytes() == src.read_bytes()
    tasks = json.loads((tmp_path / "t.json").read_text())
    tasks[1]["annotations"][0]["result"][0]["value"]["start"] += 1
    (tmp_path / "t2.json").write_text(json.dumps(tasks))
    code, out, err = run_cli(
        "labelstudio",
        "import",
        tmp_path / "t2.json",
        "--out",
        tmp_path / "b2.jsonl",
        "--rejects",
        tmp_path / "rej.jsonl",
    )
    assert code == 2 and "[1]" in err and "value.text" in err and len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "rej.jsonl").read_text()) == tasks[1]
    code, out, _ = run_cli("labelstudio", "config")
    assert code == 0 and out.startswith("<View>")
