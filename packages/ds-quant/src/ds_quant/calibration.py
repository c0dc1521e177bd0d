"""Text for calibration (GPTQ) and evaluation, tokenized into fixed-length windows.

A source is a path to a ``.txt`` file (read whole) or a ``.jsonl`` file (the ``text`` field of each
line), or ``builtin`` / ``builtin:train`` / ``builtin:validation``: ds-data's built-in corpus, which
needs the optional extra ``pip install 'ds-quant[calib]'`` (ds-quant itself depends on ds-models
only). ``builtin`` alone means the train split for calibration and the validation split for eval.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ds_quant.errors import DsQuantError

EOS = "<|endoftext|>"


def read_texts(source: str, *, flag: str = "--calib", default_split: str = "train") -> list[str]:
    """Documents of a text source (see the module docstring)."""
    if source == "builtin" or source.startswith("builtin:"):
        split = source.partition(":")[2] or default_split
        try:
            import ds_data
        except ImportError:
            raise DsQuantError(
                f"{flag}: builtin: needs ds-data (pip install 'ds-quant[calib]'), or pass a .txt/.jsonl file"
            ) from None
        corpus = ds_data.load_corpus("builtin")
        if split not in corpus:
            raise DsQuantError(f"{flag}: {source}: unknown split; expected one of {', '.join(corpus)}")
        return list(corpus[split]["text"])
    path = Path(source)
    if not path.is_file():
        raise DsQuantError(f"{flag}: {source}: file not found (expected a .txt or .jsonl file, or 'builtin')")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DsQuantError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DsQuantError(f"{path}:{lineno}: text: expected an object with a string 'text'")
            docs.append(obj["text"])
        return docs
    return [path.read_text(encoding="utf-8")]


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents encoded and joined with the EOS token (when the tokenizer has one): (N,) int64."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(
    stream: torch.Tensor,
    seq_len: int,
    n: int | None = None,
    *,
    seed: int | None = None,
    flag: str = "--calib",
) -> torch.Tensor:
    """(n, seq_len) windows of a token stream.

    seed None: the first n non-overlapping windows in order (evaluation). A seed: n windows at
    random starts (calibration; overlapping is fine). n None: every non-overlapping window.
    """
    total = stream.numel()
    if total < seq_len + 1:
        raise DsQuantError(f"{flag}: text has {total} tokens; need at least seq_len + 1 = {seq_len + 1}")
    if seed is None:
        count = total // seq_len
        if n is not None:
            count = min(count, n)
        return stream[: count * seq_len].view(count, seq_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len + 1, (n or 1,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
