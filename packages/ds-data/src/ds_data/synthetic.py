"""Schema-valid synthetic records in all twelve domains, for demos, tests and benchmarks.

Each record comes from a sentence template whose slots are entities; offsets are computed while the
text is assembled, so spans are right by construction (the tests still validate every record). Names
include non-Latin scripts and some texts end in an emoji, so offset handling downstream is exercised.
Every record is marked ``metadata.synthetic = true``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from ds_data.records import DOMAINS

# Slot fillers per entity label.
FILLERS: dict[str, list[str]] = {
    "PERSON": [
        "Maria Gonzalez",
        "Zhang Wei 张伟",
        "Ngozi Okafor",
        "Дмитрий Петров",
        "José Álvarez",
        "Aiko Tanaka",
        "Liam O'Brien",
        "Fatima Zahra",
        "Søren Kierkegaard",
        "Priya Raman",
    ],
    "ORGANIZATION": [
        "Acme Corp",
        "Northwind Bank",
        "Globex Energy",
        "Initech",
        "Umbrella Health",
        "Contoso Telecom",
        "Müller AG",
        "株式会社サンプル",
        "Helios Freight",
        "Green Valley Co-op",
    ],
    "LOCATION": ["Rotterdam", "São Paulo", "Nairobi", "Osaka", "Denver", "Kraków", "Chennai", "Québec"],
    "DATE": ["2024-03-14", "12 May 2023", "last Tuesday", "Q3 2022", "1 January 2025", "the 5th of June"],
    "MONEY": ["$12,500", "€3.2 million", "¥48,000", "£740", "$1.8 billion", "₹95,000"],
    "QUANTITY": ["40 tonnes", "3.5 MW", "120 units", "18 hectares", "2,000 litres", "75 km"],
    "PRODUCT": ["Model X200 pump", "FiberMax 1G plan", "Series 9 router", "Aurora laptop", "EcoDrill"],
    "CONDITION": ["type 2 diabetes", "hypertension", "asthma", "migraine", "chronic kidney disease"],
    "MEDICATION": ["metformin", "lisinopril", "salbutamol", "sumatriptan", "atorvastatin"],
    "REGULATION": ["GDPR", "the Clean Air Act", "Basel III", "HIPAA", "Directive 2019/944"],
    "ASSET": ["corporate bonds", "Tesla shares", "a municipal bond", "gold futures", "an index fund"],
    "FACILITY": ["Plant 7", "the north substation", "Warehouse B", "Terminal 2", "the Lakeside school"],
    "VEHICLE": ["truck 14", "flight LH 401", "the 07:15 train", "vessel MSC Aurora", "bus route 12"],
    "CROP": ["winter wheat", "soybeans", "maize", "coffee", "rice"],
    "POLICY": [
        "policy HX-2291",
        "a homeowner policy",
        "the fleet policy",
        "policy 77-B",
        "a term life policy",
    ],
}

# (template, relations as (head slot, tail slot, label), document labels, optional emoji tail)
TEMPLATES: dict[str, list[tuple[str, list[tuple[str, str, str]], list[str]]]] = {
    "healthcare": [
        (
            "{p:PERSON} was diagnosed with {c:CONDITION} on {d:DATE} and started {m:MEDICATION}.",
            [("p", "c", "diagnosed_with"), ("m", "c", "treats")],
            ["diagnosis", "treatment"],
        ),
        (
            "At {o:ORGANIZATION}, {m:MEDICATION} was prescribed for {c:CONDITION}.",
            [("m", "c", "treats")],
            ["prescription"],
        ),
    ],
    "finance": [
        (
            "{o:ORGANIZATION} paid {x:MONEY} for {a:ASSET} on {d:DATE}.",
            [("o", "x", "paid"), ("o", "a", "owns")],
            ["transaction"],
        ),
        (
            "{p:PERSON}, employed by {o:ORGANIZATION}, reported {x:MONEY} in losses under {r:REGULATION}.",
            [("p", "o", "employed_by"), ("r", "o", "regulates")],
            ["reporting", "risk"],
        ),
    ],
    "manufacturing": [
        (
            "{f:FACILITY} in {l:LOCATION} produced {q:QUANTITY} of the {pr:PRODUCT} on {d:DATE}.",
            [("f", "pr", "produces"), ("f", "l", "located_in")],
            ["production"],
        ),
        (
            "{o:ORGANIZATION} supplies the {pr:PRODUCT} to {f:FACILITY}.",
            [("o", "f", "supplies")],
            ["supply_chain"],
        ),
    ],
    "legal": [
        (
            "{o:ORGANIZATION} and {p:PERSON} signed the settlement in {l:LOCATION} on {d:DATE}.",
            [("o", "p", "party_to"), ("p", "o", "party_to")],
            ["contract", "settlement"],
        ),
        (
            "The court held that {o:ORGANIZATION} breached {r:REGULATION}.",
            [("r", "o", "regulates")],
            ["ruling"],
        ),
    ],
    "retail": [
        (
            "{p:PERSON} bought the {pr:PRODUCT} from {o:ORGANIZATION} for {x:MONEY}.",
            [("p", "x", "paid"), ("o", "pr", "supplies")],
            ["purchase"],
        ),
        (
            "{o:ORGANIZATION} opened a store in {l:LOCATION} selling {q:QUANTITY} a day.",
            [("o", "l", "located_in")],
            ["expansion"],
        ),
    ],
    "energy": [
        (
            "{f:FACILITY} near {l:LOCATION} delivered {q:QUANTITY} to the grid on {d:DATE}.",
            [("f", "l", "located_in")],
            ["generation"],
        ),
        (
            "{o:ORGANIZATION} owns {f:FACILITY} and complies with {r:REGULATION}.",
            [("o", "f", "owns"), ("r", "o", "regulates")],
            ["compliance"],
        ),
    ],
    "telecommunications": [
        (
            "{p:PERSON} switched to the {pr:PRODUCT} from {o:ORGANIZATION} on {d:DATE}.",
            [("o", "pr", "supplies")],
            ["churn"],
        ),
        (
            "{o:ORGANIZATION} installed the {pr:PRODUCT} in {l:LOCATION}.",
            [("o", "l", "located_in")],
            ["network"],
        ),
    ],
    "education": [
        (
            "{p:PERSON} enrolled at {f:FACILITY} in {l:LOCATION} on {d:DATE}.",
            [("f", "l", "located_in")],
            ["enrollment"],
        ),
        (
            "{p:PERSON} is employed by {o:ORGANIZATION} as a teacher.",
            [("p", "o", "employed_by")],
            ["staffing"],
        ),
    ],
    "transportation": [
        (
            "{v:VEHICLE} left {l:LOCATION} on {d:DATE} carrying {q:QUANTITY}.",
            [("v", "l", "located_in"), ("v", "d", "occurred_on")],
            ["logistics"],
        ),
        ("{o:ORGANIZATION} operates {v:VEHICLE} out of {f:FACILITY}.", [("o", "v", "owns")], ["operations"]),
    ],
    "agriculture": [
        (
            "{o:ORGANIZATION} harvested {q:QUANTITY} of {cr:CROP} in {l:LOCATION}.",
            [("o", "cr", "produces"), ("o", "l", "located_in")],
            ["harvest"],
        ),
        ("{p:PERSON} planted {cr:CROP} on {d:DATE}.", [("p", "cr", "produces")], ["planting"]),
    ],
    "government": [
        (
            "{o:ORGANIZATION} in {l:LOCATION} adopted {r:REGULATION} on {d:DATE}.",
            [("o", "l", "located_in"), ("r", "o", "regulates")],
            ["policy"],
        ),
        (
            "{p:PERSON} of {o:ORGANIZATION} announced a grant of {x:MONEY}.",
            [("p", "o", "employed_by"), ("o", "x", "paid")],
            ["funding"],
        ),
    ],
    "insurance": [
        (
            "{o:ORGANIZATION} covers {p:PERSON} under {po:POLICY} since {d:DATE}.",
            [("po", "p", "covers"), ("o", "po", "owns")],
            ["coverage"],
        ),
        ("{p:PERSON} filed a claim of {x:MONEY} against {po:POLICY}.", [("p", "po", "party_to")], ["claim"]),
    ],
}

EMOJI_TAILS = ["", "", "", " ✅", " 📈", " 🚚", " 👍🏽"]
_SLOT = re.compile(r"\{(\w+):(\w+)\}")


def make_record(domain: str, index: int, rng: random.Random) -> dict:
    template, relations, labels = rng.choice(TEMPLATES[domain])
    text = ""
    entities, slot_ids = [], {}
    pos = 0
    for m in _SLOT.finditer(template):
        text += template[pos : m.start()]
        slot, label = m.group(1), m.group(2)
        value = rng.choice(FILLERS[label])
        eid = f"e{len(entities) + 1}"
        slot_ids[slot] = eid
        entities.append(
            {"id": eid, "start": len(text), "end": len(text) + len(value), "label": label, "text": value}
        )
        text += value
        pos = m.end()
    text += template[pos:] + rng.choice(EMOJI_TAILS)
    rels = [
        {"id": f"r{i + 1}", "head": slot_ids[h], "tail": slot_ids[t], "label": lab}
        for i, (h, t, lab) in enumerate(relations)
    ]
    return {
        "id": f"syn_{domain}_{index:07d}",
        "domain": domain,
        "text": text,
        "labels": list(labels),
        "annotations": {"entity_recognition": entities, "relation_extraction": rels},
        "metadata": {"source": "ds-data sample", "language": "en", "synthetic": True},
    }


def sample_records(n: int, seed: int = 0) -> Iterator[dict]:
    """``n`` synthetic records, cycling through the twelve domains; the same seed gives the same records."""
    rng = random.Random(seed)
    for i in range(n):
        yield make_record(DOMAINS[i % len(DOMAINS)], i, rng)
