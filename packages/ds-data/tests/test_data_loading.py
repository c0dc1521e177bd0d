import json

import datasets
import jsonschema
import pytest

import ds_data
from ds_data.loading import FEATURES, dataset_records, load_records, records_to_dataset, write_parquet
from ds_data.record_io import write_jsonl
from ds_data.records import SCHEMA


@pytest.fixture
def varied_records(sample_records):
    """Synthetic records plus the awkward shapes: no optional fields, empty lists, relation without id,
    annotations with one list only, CRLF, emoji, non-Latin text."""
    extra = [
        {"id": "min_1", "domain": "finance", "text": "Just text.\r\nSecond line 😀"},
        {
            "id": "empty_lists",
            "domain": "legal",
            "text": "x",
            "labels": [],
            "annotations": {"entity_recognition": [], "relation_extraction": []},
        },
        {
            "id": "ents_only",
            "domain": "energy",
            "text": "東京 power 👍🏽",
            "annotations": {
                "entity_recognition": [
                    {"id": "e1", "start": 0, "end": 2, "label": "LOCATION", "text": "東京"},
                    {"id": "e2", "start": 9, "end": 11, "label": "EMOJI", "text": "👍🏽"},
                ]
            },
        },
        {
            "id": "rel_no_id",
            "domain": "insurance",
            "text": "A covers B",
            "annotations": {
                "entity_recognition": [
                    {"id": "a", "start": 0, "end": 1, "label": "ORGANIZATION", "text": "A"},
                    {"id": "b", "start": 9, "end": 10, "label": "PERSON", "text": "B"},
                ],
                "relation_extraction": [{"head": "a", "tail": "b", "label": "covers"}],
            },
            "metadata": {"annotator": "ann-7"},
        },
    ]
    recs = sample_records + extra
    assert all(ds_data.records.is_valid(r) for r in recs)
    return recs


def test_features_are_derived_from_the_schema():
    # Every schema property appears in the Features, in schema order, with the matching Arrow type.
    assert list(FEATURES) == list(SCHEMA["properties"])
    ent = FEATURES["annotations"]["entity_recognition"].feature
    assert list(ent) == list(SCHEMA["$defs"]["entity"]["properties"])
    assert ent["start"].dtype == "int64" and ent["text"].dtype == "string"
    assert FEATURES["metadata"]["synthetic"].dtype == "bool"
    assert isinstance(FEATURES["labels"], datasets.List)


def test_jsonl_dataset_parquet_jsonl_round_trip_is_lossless(varied_records, tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(varied_records, str(src))
    ds = load_records(str(src), cache_dir=str(tmp_path / "cache"))
    assert ds.features == FEATURES and ds.num_rows == len(varied_records)
    write_parquet(ds, str(tmp_path / "mid.parquet"))
    back = load_records(str(tmp_path / "mid.parquet"), cache_dir=str(tmp_path / "cache"))
    write_jsonl(dataset_records(back), str(tmp_path / "out.jsonl"))
    # Byte for byte: same records, same key order, nothing added (no nulls), nothing dropped.
    assert (tmp_path / "out.jsonl").read_bytes() == src.read_bytes()
    assert ds_data.fingerprint(ds) == ds_data.fingerprint(back)


def test_streaming_mode_yields_the_same_records(varied_records, tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(varied_records, str(src))
    it = load_records([str(src)], streaming=True)
    assert isinstance(it, datasets.IterableDataset)
    assert list(dataset_records(it)) == varied_records


def test_json_array_loads_too(varied_records, tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(varied_records, indent=2, ensure_ascii=False), encoding="utf-8")
    ds = load_records(str(p), cache_dir=str(tmp_path / "cache"))
    assert list(dataset_records(ds)) == varied_records


def test_changed_file_is_reloaded_not_served_from_cache(tmp_path):
    p = tmp_path / "r.jsonl"
    write_jsonl([{"id": "a", "domain": "retail", "text": "one"}], str(p))
    first = load_records(str(p), cache_dir=str(tmp_path / "c"))
    write_jsonl(
        [{"id": "a", "domain": "retail", "text": "two"}, {"id": "b", "domain": "retail", "text": "3"}], str(p)
    )
    second = load_records(str(p), cache_dir=str(tmp_path / "c"))
    assert first.num_rows == 1 and second.num_rows == 2 and second[0]["text"] == "two"


def test_load_rejects_bad_records_with_location(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        '{"id": "a", "domain": "retail", "text": "ok"}\n{"id": "b", "domain": "mars", "text": "x"}\n'
    )
    with pytest.raises(ds_data.DsDataError, match=r"r.jsonl:2: \$.domain: schema.domain"):
        load_records(str(p), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ds_data.DsDataError, match=r"r.jsonl:2: \$.domain: schema.domain"):
        list(load_records(str(p), streaming=True))
    with pytest.raises(ds_data.DsDataError, match=r"file\.missing"):
        load_records(str(tmp_path / "none.jsonl"), cache_dir=str(tmp_path / "c"))


def test_records_to_dataset_validates_against_reference_schema(varied_records):
    ds = records_to_dataset(varied_records)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for rec in dataset_records(ds):
        validator.validate(rec)
