"""Records into ``datasets``: the Features derived from the JSON Schema, and loading record files
(JSONL, JSON, Parquet) into a ``Dataset`` or a streaming ``IterableDataset``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import datasets

from ds_data.atomic import temp_path
from ds_data.errors import DsDataError
from ds_data.record_io import iter_items
from ds_data.records import SCHEMA, check_record, from_row, resolve_ref

_SCALARS = {"string": "string", "integer": "int64", "number": "float64", "boolean": "bool"}


def _feature(node: dict) -> Any:
    node = resolve_ref(node)
    kind = node["type"]
    if kind == "object":
        return {name: _feature(sub) for name, sub in node["properties"].items()}
    if kind == "array":
        return datasets.List(_feature(node["items"]))
    return datasets.Value(_SCALARS[kind])


def record_features() -> datasets.Features:
    """The ``datasets.Features`` of a record, walked from the JSON Schema (property order kept)."""
    return datasets.Features(_feature(SCHEMA))


FEATURES = record_features()


def dataset_records(dataset: datasets.Dataset | datasets.IterableDataset) -> Iterator[dict]:
    """Records back out of a Dataset built with the record Features (absent fields restored)."""
    for row in dataset:
        yield from_row(row)


def write_parquet(dataset: datasets.Dataset, path: str) -> None:
    tmp = temp_path(path)
    try:
        dataset.to_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _valid_records(paths: list[str], stamps: Any = None) -> Iterator[dict]:
    # `stamps` is unused here: it is in gen_kwargs so that datasets' cache key changes with the files.
    for path in paths:
        for item in iter_items(path):
            issue = item.issue
            if issue is None:
                issues = check_record(item.record)
                issue = issues[0] if issues else None
            if issue is not None:
                where = f"{path}:{item.line}" if item.line else path
                raise DsDataError(f"{where}: {issue.path}: {issue.code}: {issue.message}")
            yield item.record


def load_records(
    paths: str | Iterable[str], *, streaming: bool = False, cache_dir: str | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load record files (JSONL, JSON, Parquet) into a Dataset with the schema-derived Features.

    Every record is validated on the way in; the first bad one raises :class:`DsDataError` naming
    file, line, JSON path and error code (use ``ds-data validate`` to see them all). With
    ``streaming=True`` an IterableDataset reads the files lazily, in constant memory.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise DsDataError("paths: expected at least one record file")
    if streaming:
        return datasets.IterableDataset.from_generator(
            _valid_records, features=FEATURES, gen_kwargs={"paths": paths}
        )
    # The builder caches by generator arguments; file sizes and mtimes make a changed file a new dataset.
    stamps = [(os.path.getsize(p), os.stat(p).st_mtime_ns) if os.path.isfile(p) else None for p in paths]
    try:
        return datasets.Dataset.from_generator(
            _valid_records,
            features=FEATURES,
            gen_kwargs={"paths": paths, "stamps": stamps},
            cache_dir=cache_dir,
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, DsDataError):
            cause = cause.__cause__
        if cause is not None:
            raise DsDataError(str(cause)) from None
        raise


def records_to_dataset(records: Iterable[dict]) -> datasets.Dataset:
    """In-memory records (already valid) to a Dataset with the record Features."""
    return datasets.Dataset.from_list(list(records), features=FEATURES)
