"""Packing tokenized text into fixed-length blocks for language modelling, and dataset fingerprints.

``pack`` goes through ``datasets.map`` (batched, ``num_proc`` workers): each batch of documents is
tokenized, joined with EOS after every document, and cut into ``seq_len`` blocks; the tail of a batch
shorter than ``seq_len`` is dropped (as in HF ``run_clm``'s ``group_texts``). Batches are contiguous
slices of the input, so the result is the same for any ``num_proc``... as long as the batch boundaries
are: a worker's shard boundary is also a batch boundary, which only moves a few tail tokens.
The output is cached on disk under a name derived from the content fingerprints of the dataset and
the tokenizer plus ``seq_len``, so a second call with the same inputs loads the cached Arrow file.
"""

from __future__ import annotations

import hashlib
import json
import os

import datasets
import pyarrow as pa
from tokenizers import Tokenizer

from ds_data.errors import DsDataError
from ds_data.tokenizer import EOS

PACK_BATCH_SIZE = 1000  # documents per map batch; also the granularity of dropped tails
_FINGERPRINT_ROWS = 8192


def fingerprint(dataset: datasets.Dataset) -> str:
    """A content hash of a Dataset (features + every value), stable across processes and machines.

    Unlike ``dataset._fingerprint`` it does not depend on how the dataset was built (from_dict, a
    Parquet file, a cache), only on what is in it, so it can go into ``provenance.json``.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise DsDataError(f"dataset: expected datasets.Dataset, got {type(dataset).__name__}")
    h = hashlib.sha256()
    h.update(json.dumps(dataset.features.to_dict(), sort_keys=True).encode())
    h.update(str(dataset.num_rows).encode())
    table = dataset.with_format("arrow")
    for start in range(0, dataset.num_rows, _FINGERPRINT_ROWS):
        # `take` materialises fresh, unsliced buffers, so chunking of the source does not leak into the
        # bytes; the schema is stripped of metadata for the same reason.
        rows = table[start : start + _FINGERPRINT_ROWS]
        rows = rows.take(pa.array(range(rows.num_rows), pa.int64()))
        arrays = [pa.concat_arrays(c.chunks) if c.num_chunks else pa.array([], c.type) for c in rows.columns]
        batch = pa.RecordBatch.from_arrays(arrays, schema=rows.schema.remove_metadata())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        h.update(sink.getvalue())
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:32]


def default_cache_dir() -> str:
    base = os.environ.get("DS_DATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ds", "data"
    )
    return base


def _pack_batch(batch: dict, tokenizer: Tokenizer, seq_len: int, eos_id: int) -> dict:
    stream: list[int] = []
    for enc in tokenizer.encode_batch(batch["text"], add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    return {"input_ids": [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]}


def pack(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    seq_len: int,
    num_proc: int = 1,
    *,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Tokenize the ``text`` column and pack it into rows of exactly ``seq_len`` token ids.

    Returns a Dataset with one column, ``input_ids`` (int32, length ``seq_len``), EOS after every
    document. Cached in ``cache_dir`` (default ``$DS_DATA_CACHE`` or ``~/.cache/ds/data``).
    """
    if not isinstance(dataset, datasets.Dataset):
        raise DsDataError(f"dataset: expected datasets.Dataset, got {type(dataset).__name__}")
    if "text" not in dataset.column_names:
        raise DsDataError(f"dataset: text: no 'text' column (columns: {dataset.column_names})")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DsDataError(f"seq_len: expected an integer >= 2, got {seq_len!r}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise DsDataError(f"num_proc: expected an integer >= 1, got {num_proc!r}")
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise DsDataError(f"tokenizer: no {EOS} token; train it with ds_data.train_tokenizer")
    # The key covers everything the output depends on; num_proc is in it because shard boundaries
    # decide which tail tokens are dropped.
    key = hashlib.sha256(
        f"{fingerprint(dataset)}|{tokenizer_fingerprint(tokenizer)}|{seq_len}|{num_proc}|"
        f"{PACK_BATCH_SIZE}".encode()
    ).hexdigest()[:32]
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len)})
    return dataset.select_columns(["text"]).map(
        _pack_batch,
        batched=True,
        batch_size=PACK_BATCH_SIZE,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "eos_id": eos_id},
        features=features,
        cache_file_name=os.path.join(cache_dir, f"pack-{key}.arrow"),
        load_from_cache_file=True,
        new_fingerprint=key,
        desc=f"packing into {seq_len}-token blocks",
    )
