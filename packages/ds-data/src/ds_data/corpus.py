"""Text corpora for language modelling: plain text files, the ``text`` of JSONL records, and one built-in
corpus of real English prose that ships with every Python installation.

The built-in corpus is CPython's ``pydoc_data/topics.py``: the reference-manual topics that ``help()``
shows (about 0.5 MB of English prose, Python Software Foundation License). It is installed with the
interpreter itself, so the quickstart works offline with no download.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import datasets

from ds_data.errors import DsDataError

BUILTIN = "builtin"
BUILTIN_SOURCE = "pydoc_data.topics (CPython documentation topics, PSF License)"
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})


def builtin_documents() -> list[str]:
    """The built-in corpus: one document per paragraph of the Python documentation topics."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data out of the stdlib
        raise DsDataError(
            "builtin: corpus: pydoc_data.topics is not installed with this Python; pass text files instead"
        ) from exc
    docs: list[str] = []
    for name in sorted(topics):  # sorted: the dict order is an implementation detail of the release
        docs.extend(_paragraphs(topics[name]))
    return docs


def _paragraphs(text: str) -> list[str]:
    # Blank lines separate paragraphs; a paragraph is a natural document boundary for EOS packing.
    blocks = text.replace("\r\n", "\n").split("\n\n")
    return [b.strip("\n") for b in blocks if b.strip()]


def read_text_file(path: str) -> list[str]:
    """Documents of a ``.txt`` file (paragraphs) or a ``.jsonl`` file (the ``text`` of each line)."""
    if not os.path.exists(path):
        raise DsDataError(f"{path}: file not found")
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DsDataError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DsDataError(f"{path}:{lineno}: text: expected an object with a string 'text'")
                docs.append(obj["text"])
        return docs
    if path.endswith(".txt"):
        try:
            with open(path, encoding="utf-8") as f:
                return _paragraphs(f.read())
        except UnicodeDecodeError:
            raise DsDataError(f"{path}: not UTF-8 text") from None
    raise DsDataError(f"{path}: unsupported corpus file; expected .txt or .jsonl")


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by a hash of each document's text.

    Hashing (not a seeded shuffle) keeps a document in the same split when files are added or reordered.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DsDataError(f"val_fraction: expected a number in (0, 1), got {val_fraction}")
    train, val = [], []
    for doc in docs:
        h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "big")
        (val if h / 2**64 < val_fraction else train).append(doc)
    # Tiny corpora: never leave a split empty when there are two documents to share.
    if not val and len(train) > 1:
        val.append(train.pop())
    if not train and len(val) > 1:
        train.append(val.pop())
    return train, val


def load_corpus(
    name_or_paths: str | Iterable[str] = BUILTIN, *, val_fraction: float = 0.05
) -> datasets.DatasetDict:
    """Load a corpus as a DatasetDict with "train" and "validation" splits and one column, "text".

    ``name_or_paths`` is ``"builtin"`` or a list of ``.txt`` / ``.jsonl`` paths (a single path string
    works too). The split is deterministic.
    """
    if isinstance(name_or_paths, str):
        paths = None if name_or_paths == BUILTIN else [name_or_paths]
    else:
        paths = list(name_or_paths)
        if not paths:
            raise DsDataError("name_or_paths: expected 'builtin' or at least one file")
    docs = builtin_documents() if paths is None else [d for p in paths for d in read_text_file(p)]
    if not docs:
        raise DsDataError(f"{', '.join(paths or [BUILTIN])}: corpus is empty")
    train, val = split_documents(docs, val_fraction)
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train}, features=TEXT_FEATURES),
            "validation": datasets.Dataset.from_dict({"text": val}, features=TEXT_FEATURES),
        }
    )
