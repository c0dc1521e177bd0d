"""``ds-data stats``: what is in a set of records, as numbers and as rich tables."""

from __future__ import annotations

import statistics
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer


@dataclass
class RecordStats:
    records: int = 0
    domains: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    entity_labels: Counter = field(default_factory=Counter)
    relation_labels: Counter = field(default_factory=Counter)
    entities: int = 0
    relations: int = 0
    synthetic: int = 0
    # One unsigned int per record: constant-size per record, small enough for millions.
    token_lengths: array = field(default_factory=lambda: array("I"))

    def add(self, record: dict, tokenizer: Tokenizer | None = None) -> None:
        self.records += 1
        self.domains[record["domain"]] += 1
        self.labels.update(record.get("labels", ()))
        ann = record.get("annotations", {})
        ents = ann.get("entity_recognition", ())
        rels = ann.get("relation_extraction", ())
        self.entities += len(ents)
        self.relations += len(rels)
        self.entity_labels.update(e["label"] for e in ents)
        self.relation_labels.update(r["label"] for r in rels)
        self.synthetic += bool(record.get("metadata", {}).get("synthetic"))
        text = record["text"]
        n = len(tokenizer.encode(text, add_special_tokens=False).ids) if tokenizer else len(text.split())
        self.token_lengths.append(n)

    def token_summary(self) -> dict:
        lengths = sorted(self.token_lengths)
        if not lengths:
            return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0, "total": 0}
        return {
            "min": lengths[0],
            "mean": round(statistics.fmean(lengths), 2),
            "p50": lengths[len(lengths) // 2],
            "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
            "max": lengths[-1],
            "total": sum(lengths),
        }

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "synthetic": self.synthetic,
            "entities": self.entities,
            "relations": self.relations,
            "domains": dict(self.domains.most_common()),
            "labels": dict(self.labels.most_common()),
            "entity_labels": dict(self.entity_labels.most_common()),
            "relation_labels": dict(self.relation_labels.most_common()),
            "token_lengths": self.token_summary(),
        }


def compute_stats(records: Iterable[dict], tokenizer: Tokenizer | None = None) -> RecordStats:
    """Counts over valid records; token lengths use ``tokenizer`` or, without one, whitespace words."""
    stats = RecordStats()
    for rec in records:
        stats.add(rec, tokenizer)
    return stats


def _counter_table(title: str, counts: dict, total: int) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("name")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for name, n in counts.items():
        table.add_row(name, str(n), f"{100 * n / total:.1f}%" if total else "-")
    return table


def print_stats(stats: RecordStats, console: Console, *, token_unit: str = "words", invalid: int = 0) -> None:
    d = stats.to_dict()
    overview = Table(title="records", title_justify="left", show_header=False)
    overview.add_column("what")
    overview.add_column("value", justify="right")
    overview.add_row("valid records", str(stats.records))
    if invalid:
        overview.add_row("invalid records (skipped)", str(invalid))
    overview.add_row("synthetic", str(stats.synthetic))
    overview.add_row("entities", str(stats.entities))
    overview.add_row("relations", str(stats.relations))
    tl = d["token_lengths"]
    overview.add_row(
        f"length in {token_unit} (min/mean/p50/p95/max)",
        f"{tl['min']} / {tl['mean']} / {tl['p50']} / {tl['p95']} / {tl['max']}",
    )
    overview.add_row(f"total {token_unit}", str(tl["total"]))
    console.print(overview)
    console.print(_counter_table("records per domain", d["domains"], stats.records))
    console.print(_counter_table("document labels", d["labels"], stats.records))
    console.print(_counter_table("entity labels", d["entity_labels"], stats.entities))
    console.print(_counter_table("relation labels", d["relation_labels"], stats.relations))
