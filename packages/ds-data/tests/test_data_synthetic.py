import jsonschema

import ds_data
from ds_data.records import DOMAINS, SCHEMA


def test_samples_cover_all_domains_are_valid_and_marked():
    recs = list(ds_data.sample_records(240, seed=11))
    assert {r["domain"] for r in recs} == set(DOMAINS)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for r in recs:
        validator.validate(r)  # the reference validator, not only ours
        assert ds_data.check_record(r) == []
        assert r["metadata"]["synthetic"] is True
        assert r["annotations"]["entity_recognition"] and r["labels"]
    assert len({r["id"] for r in recs}) == 240
    # Offsets are exercised beyond ASCII: some texts have astral characters, some non-Latin names.
    assert any(any(ord(c) > 0xFFFF for c in r["text"]) for r in recs)
    assert any(any("\u4e00" <= c <= "\u9fff" or "\u0400" <= c <= "\u04ff" for c in r["text"]) for r in recs)


def test_samples_are_deterministic_per_seed():
    a = list(ds_data.sample_records(30, seed=1))
    assert a == list(ds_data.sample_records(30, seed=1))
    assert a != list(ds_data.sample_records(30, seed=2))
