"""Label Studio round trip: ds records <-> Label Studio tasks with annotations, and the labelling config.

Label Studio keeps a task's fields under ``data`` and each annotation as a list of ``result`` items:

- an entity is ``{"id", "type": "labels", "from_name": "label", "to_name": "text",
  "value": {"start", "end", "text", "labels": [LABEL]}}``;
- a relation is ``{"type": "relation", "from_id", "to_id", "direction", "labels": [LABEL]}``;
- the domain is a ``choices`` result from the ``domain`` control.

Offsets differ: ds offsets count Python code points, Label Studio's count JavaScript UTF-16 code
units, so every character outside the Basic Multilingual Plane (most emoji) counts twice there.
Offsets are converted both ways and every span is checked against the text; a span that splits a
surrogate pair or does not match its stored text is an error, never silently shifted.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from ds_data.errors import DsDataError
from ds_data.records import DOMAINS, ENTITY_LABELS, RELATION_LABELS, check_record

ENTITY_CONTROL = "label"
DOMAIN_CONTROL = "domain"
TEXT_OBJECT = "text"
OFFSETS = ("utf16", "codepoint")


# ---------------------------------------------------------------------------------------------------
# Offsets.


def utf16_offsets(text: str) -> list[int]:
    """``out[i]`` is the UTF-16 offset of code point ``i`` (``out[len(text)]`` the total length)."""
    out = [0] * (len(text) + 1)
    pos = 0
    for i, ch in enumerate(text):
        out[i] = pos
        pos += 2 if ord(ch) > 0xFFFF else 1
    out[len(text)] = pos
    return out


def _to_codepoints(text: str, offsets: str) -> dict[int, int]:
    """Map from a Label Studio offset to a code point index, for every character boundary."""
    if offsets == "codepoint":
        return {i: i for i in range(len(text) + 1)}
    return {u: i for i, u in enumerate(utf16_offsets(text))}


# ---------------------------------------------------------------------------------------------------
# The labelling config.


def labelling_config(records: Iterable[dict] = ()) -> str:
    """The Label Studio labelling-config XML, derived from the schema: the entity and relation label
    vocabularies (plus any label used in ``records``, so exported annotations always fit) and the
    twelve domains as a single choice."""
    records = list(records)
    ent_labels = list(ENTITY_LABELS)
    rel_labels = list(RELATION_LABELS)
    for rec in records:
        ann = rec.get("annotations", {})
        ent_labels += [e["label"] for e in ann.get("entity_recognition", ()) if e["label"] not in ent_labels]
        rel_labels += [r["label"] for r in ann.get("relation_extraction", ()) if r["label"] not in rel_labels]
    view = ET.Element("View")
    labels = ET.SubElement(view, "Labels", name=ENTITY_CONTROL, toName=TEXT_OBJECT)
    for lab in ent_labels:
        ET.SubElement(labels, "Label", value=lab)
    ET.SubElement(view, "Text", name=TEXT_OBJECT, value="$text")
    relations = ET.SubElement(view, "Relations")
    for lab in rel_labels:
        ET.SubElement(relations, "Relation", value=lab)
    choices = ET.SubElement(view, "Choices", name=DOMAIN_CONTROL, toName=TEXT_OBJECT, choice="single")
    for dom in DOMAINS:
        ET.SubElement(choices, "Choice", value=dom)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode")


# ---------------------------------------------------------------------------------------------------
# ds record -> Label Studio task.


def to_task(record: dict, *, offsets: str = "utf16") -> dict:
    """A Label Studio task (``data`` plus one annotation) for one valid ds record."""
    if offsets not in OFFSETS:
        raise DsDataError(f"--offsets: expected one of {', '.join(OFFSETS)}, got {offsets!r}")
    issues = check_record(record)
    if issues:
        i = issues[0]
        raise DsDataError(f"record {record.get('id')!r}: {i.path}: {i.code}: {i.message}")
    text = record["text"]
    conv = utf16_offsets(text) if offsets == "utf16" else list(range(len(text) + 1))
    ann = record.get("annotations", {})
    result: list[dict] = []
    for ent in ann.get("entity_recognition", ()):
        result.append(
            {
                "id": ent["id"],
                "type": "labels",
                "from_name": ENTITY_CONTROL,
                "to_name": TEXT_OBJECT,
                "value": {
                    "start": conv[ent["start"]],
                    "end": conv[ent["end"]],
                    "text": ent["text"],
                    "labels": [ent["label"]],
                },
            }
        )
    for rel in ann.get("relation_extraction", ()):
        item = {
            "type": "relation",
            "from_id": rel["head"],
            "to_id": rel["tail"],
            "direction": "right",
            "labels": [rel["label"]],
        }
        if "id" in rel:
            item["id"] = rel["id"]
        result.append(item)
    result.append(
        {
            "id": "domain",
            "type": "choices",
            "from_name": DOMAIN_CONTROL,
            "to_name": TEXT_OBJECT,
            "value": {"choices": [record["domain"]]},
        }
    )
    # Everything that is not an annotation travels in `data`, so import can rebuild the record.
    data = {"text": text, "ds_id": record["id"], "domain": record["domain"]}
    for key in ("labels", "metadata"):
        if key in record:
            data[key] = record[key]
    # Which annotation lists the record has (possibly empty, possibly none), so import restores exactly.
    if "annotations" in record:
        data["ds_annotation_keys"] = list(record["annotations"])
    return {"data": data, "annotations": [{"result": result}]}


def export_tasks(records: Iterable[dict], *, offsets: str = "utf16") -> list[dict]:
    return [to_task(r, offsets=offsets) for r in records]


# ---------------------------------------------------------------------------------------------------
# Label Studio task -> ds record.


def _latest_annotation(task: dict) -> dict | None:
    anns = [a for a in task.get("annotations") or () if not a.get("was_cancelled")]
    if not anns:
        return None
    # Export order is creation order; updated_at (ISO 8601) breaks ties when present.
    return max(enumerate(anns), key=lambda ia: (ia[1].get("updated_at") or "", ia[0]))[1]


def from_task(task: dict, *, offsets: str = "utf16") -> dict:
    """A ds record from a Label Studio task (export JSON): its latest non-cancelled annotation."""
    if offsets not in OFFSETS:
        raise DsDataError(f"--offsets: expected one of {', '.join(OFFSETS)}, got {offsets!r}")
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise DsDataError("task: expected an object with a 'data' object")
    data = task["data"]
    tid = data.get("ds_id") or (f"ls_{task['id']}" if "id" in task else None)
    where = f"task {tid!r}"
    text = data.get("text")
    if not isinstance(text, str):
        raise DsDataError(f"{where}: data.text: expected a string")
    record: dict = {"id": tid, "domain": data.get("domain"), "text": text}
    if "labels" in data:
        record["labels"] = data["labels"]
    to_cp = _to_codepoints(text, offsets)
    entities, relations = [], []
    ann = _latest_annotation(task)
    for k, res in enumerate(ann.get("result", ()) if ann else ()):
        rtype = res.get("type")
        rwhere = f"{where}: result[{k}]"
        if rtype == "labels":
            value = res.get("value", {})
            labs = value.get("labels") or []
            if len(labs) != 1:
                raise DsDataError(f"{rwhere}: value.labels: expected exactly one label per span, got {labs}")
            try:
                start, end = to_cp[value["start"]], to_cp[value["end"]]
            except KeyError:
                raise DsDataError(
                    f"{rwhere}: value.start/end: {value.get('start')}..{value.get('end')} is not a character "
                    f"boundary of the text in {offsets} offsets"
                ) from None
            span = text[start:end]
            if "text" in value and value["text"] != span:
                raise DsDataError(
                    f"{rwhere}: value.text: {value['text']!r} differs from the text at {offsets} offsets "
                    f"{value['start']}..{value['end']} ({span!r})"
                )
            entities.append(
                {"id": res.get("id") or f"e{k}", "start": start, "end": end, "label": labs[0], "text": span}
            )
        elif rtype == "relation":
            head, tail = res.get("from_id"), res.get("to_id")
            if res.get("direction") == "left":  # drawn from tail to head
                head, tail = tail, head
            labs = res.get("labels") or ["related"]
            rel = {"head": head, "tail": tail, "label": labs[0]}
            if res.get("id"):
                rel = {"id": res["id"], **rel}
            relations.append(rel)
        elif rtype == "choices" and res.get("from_name") == DOMAIN_CONTROL:
            chosen = res.get("value", {}).get("choices") or []
            if chosen:
                record["domain"] = chosen[0]
    found = {"entity_recognition": entities, "relation_extraction": relations}
    if "ds_id" in data:  # exported by ds: restore exactly the annotation lists the record had
        keys = data.get("ds_annotation_keys")
        annotations = {k: v for k, v in found.items() if (keys is not None and k in keys) or v}
        if keys is not None or annotations:
            record["annotations"] = annotations
    else:  # a task from elsewhere
        record["annotations"] = found
    if "metadata" in data:
        record["metadata"] = data["metadata"]
    issues = check_record(record)
    if issues:
        i = issues[0]
        raise DsDataError(f"{where}: {i.path}: {i.code}: {i.message}")
    return record


def import_tasks(tasks: Iterable[dict], *, offsets: str = "utf16") -> list[dict]:
    return [from_task(t, offsets=offsets) for t in tasks]
