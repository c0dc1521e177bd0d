"""The labelled record: its JSON Schema, the checks a schema cannot express, and what is derived from it.

``schema/record.schema.json`` is the single source of truth. This module loads it once and derives:

- a compiled validator (``fastjsonschema``) for the fast path: one call per record;
- the reference ``jsonschema`` validator, run only on records the fast path rejects, to report every
  error with its JSON path and an error code;
- the domain, entity-label and relation-label vocabularies (the ``enum`` and ``examples`` keywords),
  used by the sampler and the Label Studio labelling config.

The ``datasets.Features`` are derived from the same schema in :mod:`ds_data.loading`.

Every problem is an :class:`Issue` with a stable ``code`` (the table ``CODES``) and a JSON path such as
``$.annotations.entity_recognition[2].end``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import fastjsonschema

SCHEMA_FILE = "schema/record.schema.json"
SCHEMA: dict = json.loads(resources.files("ds_data").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))

DOMAINS: tuple[str, ...] = tuple(SCHEMA["properties"]["domain"]["enum"])
ENTITY_LABELS: tuple[str, ...] = tuple(SCHEMA["$defs"]["entity"]["properties"]["label"]["examples"])
RELATION_LABELS: tuple[str, ...] = tuple(SCHEMA["$defs"]["relation"]["properties"]["label"]["examples"])

# Every error code ds-data reports, with what it means. Codes are stable: scripts may match on them.
CODES: dict[str, str] = {
    # whole files
    "file.missing": "the path does not exist",
    "file.unreadable": "the path is a directory or cannot be opened",
    "file.format": "the file extension is not .jsonl, .json or .parquet",
    "file.empty": "the file has no records",
    "file.binary": "the file is binary, not UTF-8 JSON text",
    "file.parquet": "the file is not a readable Parquet file",
    # one record's bytes
    "json.malformed": "the line (or JSON document) is not valid JSON",
    "json.encoding": "the line is not valid UTF-8",
    "json.not_object": "the record is valid JSON but not an object",
    # the JSON Schema
    "schema.required": "a required field is missing",
    "schema.unknown_field": "a field the schema does not define",
    "schema.type": "a field has the wrong JSON type",
    "schema.domain": "the domain is not one of the twelve domains",
    "schema.empty": "a string that must not be empty is empty",
    "schema.too_long": "a string is longer than the schema allows",
    "schema.pattern": "a string does not match the schema's pattern (e.g. the id)",
    "schema.minimum": "a number is below the schema's minimum (e.g. a negative offset)",
    "schema.duplicate": "an array that must hold unique items has duplicates (labels)",
    "schema.invalid": "any other schema violation",
    # the semantic pass
    "span.order": "entity start is not before end",
    "span.range": "entity end is past the end of the text",
    "span.mismatch": "text[start:end] differs from the entity's stored text",
    "entity.duplicate_id": "two entities of one record share an id",
    "relation.duplicate_id": "two relations of one record share an id",
    "relation.unknown_head": "a relation's head is not an entity id of the record",
    "relation.unknown_tail": "a relation's tail is not an entity id of the record",
    "record.duplicate_id": "the record id was already seen in this validation run",
}


@dataclass(frozen=True)
class Issue:
    """One problem with one record (or a whole file): where (JSON path), what (code) and why."""

    path: str
    code: str
    message: str


def json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


# ---------------------------------------------------------------------------------------------------
# Validation: fast path, then the reference validator for messages, then the semantic pass.


def resolve_ref(node: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    if not ref.startswith("#/"):
        raise ValueError(f"{SCHEMA_FILE}: {ref}: only local $ref is supported")
    target: Any = SCHEMA
    for part in ref[2:].split("/"):
        target = target[part]
    return target


def _inline_refs(node: Any) -> Any:
    """A copy of the schema with every local ``$ref`` replaced by its target. fastjsonschema compiles a
    ``$ref`` into a function call that formats a path string per array item; inlined, the generated
    code runs about twice as fast. (It also rewrites ``$ref`` in the dict it is given: a copy is safer.)"""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(resolve_ref(node))
        return {k: _inline_refs(v) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v) for v in node]
    return node


_fast_validate = fastjsonschema.compile(_inline_refs(SCHEMA))


@functools.cache
def _reference():
    # Imported on first use: only failing records need it, and `ds-data validate` starts faster.
    import jsonschema

    return jsonschema.Draft202012Validator(SCHEMA)


_KEYWORD_CODES = {
    "type": "schema.type",
    "pattern": "schema.pattern",
    "minimum": "schema.minimum",
    "uniqueItems": "schema.duplicate",
    "maxLength": "schema.too_long",
}


def schema_issues(record: Any) -> list[Issue]:
    """Every JSON Schema violation of ``record`` (the slow, detailed path)."""
    if not isinstance(record, dict):
        return [Issue("$", "json.not_object", f"expected a JSON object, got {type(record).__name__}")]
    issues = []
    for err in _reference().iter_errors(record):
        path = list(err.absolute_path)
        if err.validator == "required":
            for key in err.validator_value:
                if key not in err.instance:
                    issues.append(Issue(json_path([*path, key]), "schema.required", f"'{key}' is required"))
        elif err.validator == "additionalProperties":
            known = err.schema.get("properties", {})
            for key in err.instance:
                if key not in known:
                    issues.append(
                        Issue(
                            json_path([*path, key]), "schema.unknown_field", f"'{key}' is not a known field"
                        )
                    )
        elif err.validator == "enum" and path == ["domain"]:
            issues.append(
                Issue("$.domain", "schema.domain", f"{err.instance!r} is not one of {', '.join(DOMAINS)}")
            )
        elif err.validator == "minLength" and err.validator_value == 1:
            issues.append(Issue(json_path(path), "schema.empty", "must not be empty"))
        else:
            code = _KEYWORD_CODES.get(str(err.validator), "schema.invalid")
            # jsonschema quotes the whole offending value; keep a problem to one readable line.
            msg = err.message if len(err.message) <= 160 else err.message[:157] + "..."
            issues.append(Issue(json_path(path), code, msg))
    issues.sort(key=lambda i: i.path)
    return issues


def semantic_issues(record: dict) -> list[Issue]:
    """What the schema cannot say; ``record`` must already satisfy the schema."""
    ann = record.get("annotations")
    if not ann:
        return []
    issues: list[Issue] = []
    text = record["text"]
    ids: set[str] = set()
    for i, ent in enumerate(ann.get("entity_recognition", ())):
        eid = ent["id"]
        if eid in ids:
            issues.append(
                Issue(
                    f"$.annotations.entity_recognition[{i}].id", "entity.duplicate_id", f"id {eid!r} repeats"
                )
            )
        ids.add(eid)
        # JSON Schema counts 3.0 as an integer; slicing needs a real int.
        start, end = int(ent["start"]), int(ent["end"])
        where = f"$.annotations.entity_recognition[{i}]"
        if start >= end:
            issues.append(
                Issue(f"{where}.end", "span.order", f"end {end} must be greater than start {start}")
            )
        elif end > len(text):
            issues.append(
                Issue(f"{where}.end", "span.range", f"end {end} is past the text's {len(text)} characters")
            )
        elif text[start:end] != ent["text"]:
            issues.append(
                Issue(
                    f"{where}.text",
                    "span.mismatch",
                    f"text[{start}:{end}] is {text[start:end]!r}, not {ent['text']!r}",
                )
            )
    rel_ids: set[str] = set()
    for i, rel in enumerate(ann.get("relation_extraction", ())):
        where = f"$.annotations.relation_extraction[{i}]"
        rid = rel.get("id")
        if rid is not None:
            if rid in rel_ids:
                issues.append(Issue(f"{where}.id", "relation.duplicate_id", f"id {rid!r} repeats"))
            rel_ids.add(rid)
        if rel["head"] not in ids:
            issues.append(
                Issue(f"{where}.head", "relation.unknown_head", f"no entity with id {rel['head']!r}")
            )
        if rel["tail"] not in ids:
            issues.append(
                Issue(f"{where}.tail", "relation.unknown_tail", f"no entity with id {rel['tail']!r}")
            )
    return issues


def check_record(record: Any) -> list[Issue]:
    """All issues of one decoded record: [] when it is valid."""
    try:
        _fast_validate(record)
    except fastjsonschema.JsonSchemaException:
        issues = schema_issues(record)
        # The two validators agree on the same schema; keep a fallback should they ever not.
        return issues or [Issue("$", "schema.invalid", "rejected by the compiled schema")]
    return semantic_issues(record)


def is_valid(record: Any) -> bool:
    return not check_record(record)


# ---------------------------------------------------------------------------------------------------
# Arrow rows.


def from_row(row: dict) -> dict:
    """An Arrow row back to a record: Arrow has no 'absent', it stores null; the schema allows no null,
    so a null is an absent optional field and is dropped (recursively)."""
    out = {}
    for key, value in row.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = from_row(value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            value = [from_row(v) for v in value]
        out[key] = value
    return out
