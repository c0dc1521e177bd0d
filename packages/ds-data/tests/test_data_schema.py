import copy
import json
import os
import random

import jsonschema
import pytest

from ds_data.records import (
    DOMAINS,
    ENTITY_LABELS,
    RELATION_LABELS,
    SCHEMA,
    _fast_validate,
    check_record,
    schema_issues,
)
from ds_data.synthetic import sample_records


def test_schema_file_is_draft_2020_12_and_ships_in_the_package():
    import ds_data

    path = os.path.join(os.path.dirname(ds_data.__file__), "schema", "record.schema.json")
    with open(path) as f:
        assert json.load(f) == SCHEMA
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert len(DOMAINS) == 12 and len(set(DOMAINS)) == 12
    assert {"healthcare", "finance", "manufacturing"} <= set(DOMAINS)
    assert "PERSON" in ENTITY_LABELS and "treats" in RELATION_LABELS


def _mutations(rec, rng):
    """Random single-field corruptions: each must be judged the same by both validators."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((*path, k))
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append((*path, i))
                walk(v, (*path, i))

    walk(rec, ())
    for _ in range(6):
        r = copy.deepcopy(rec)
        path = rng.choice(paths)
        parent = r
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = rng.choice([None, 1, -3, 2.5, "", "x", [], {}, True, "healthcare"])
        yield r


def test_compiled_and_reference_validators_agree():
    rng = random.Random(0)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    n_bad = 0
    for rec in sample_records(60, seed=1):
        for r in [rec, *_mutations(rec, rng)]:
            ref_ok = validator.is_valid(r)
            try:
                _fast_validate(r)
                fast_ok = True
            except Exception:
                fast_ok = False
            assert fast_ok == ref_ok, r
            assert (schema_issues(r) == []) == ref_ok
            n_bad += not ref_ok
    assert n_bad > 100


@pytest.mark.parametrize("start", [3.0, 0.0])
def test_integral_floats_are_integers_as_in_json_schema(start):
    # JSON Schema counts 3.0 as an integer; the semantic pass must not crash slicing with it.
    rec = {
        "id": "f",
        "domain": "retail",
        "text": "abc def",
        "annotations": {
            "entity_recognition": [
                {
                    "id": "e",
                    "start": start,
                    "end": start + 3,
                    "label": "X",
                    "text": "abc def"[int(start) : int(start) + 3],
                }
            ]
        },
    }
    assert check_record(rec) == []
