"""ds-data: labelled-record schema, validation, datasets loading, tokenizer training, packing and the
Label Studio round trip.

Names are imported on first use (PEP 562), so ``ds-data validate`` does not pay for importing
``datasets`` and ``tokenizers``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ds_data.__about__ import __version__
from ds_data.errors import DsDataError

_EXPORTS = {
    "load_corpus": "corpus",
    "fingerprint": "packing",
    "pack": "packing",
    "EOS": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "FEATURES": "loading",
    "dataset_records": "loading",
    "load_records": "loading",
    "records_to_dataset": "loading",
    "write_parquet": "loading",
    "iter_items": "record_io",
    "write_jsonl": "record_io",
    "CODES": "records",
    "DOMAINS": "records",
    "SCHEMA": "records",
    "Issue": "records",
    "check_record": "records",
    "is_valid": "records",
    "compute_stats": "stats",
    "sample_records": "synthetic",
    "Problem": "validate",
    "Summary": "validate",
    "validate_files": "validate",
}

__all__ = [
    "CODES",
    "DOMAINS",
    "EOS",
    "FEATURES",
    "SCHEMA",
    "DsDataError",
    "Issue",
    "Problem",
    "Summary",
    "__version__",
    "check_record",
    "compute_stats",
    "dataset_records",
    "fingerprint",
    "is_valid",
    "iter_items",
    "load_corpus",
    "load_records",
    "load_tokenizer",
    "pack",
    "records_to_dataset",
    "sample_records",
    "train_tokenizer",
    "validate_files",
    "write_jsonl",
    "write_parquet",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ds_data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ds_data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from ds_data.corpus import load_corpus
    from ds_data.loading import FEATURES, dataset_records, load_records, records_to_dataset, write_parquet
    from ds_data.packing import fingerprint, pack
    from ds_data.record_io import iter_items, write_jsonl
    from ds_data.records import CODES, DOMAINS, SCHEMA, Issue, check_record, is_valid
    from ds_data.stats import compute_stats
    from ds_data.synthetic import sample_records
    from ds_data.tokenizer import EOS, load_tokenizer, train_tokenizer
    from ds_data.validate import Problem, Summary, validate_files
