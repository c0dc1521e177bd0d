"""Text for calibration (GPTQ) and evaluation, tokenized into fixed-length windows.

Reading text is ds-data's job, so a source is whatever ds-data reads: a ``.txt`` file (its
paragraphs are the documents, as ds-data packs training text) or a ``.jsonl`` file (the ``text``
field of each line), or ``builtin`` / ``builtin:train`` / ``builtin:validation``, ds-data's
built-in corpus. ds-quant itself depends on ds-models only; reading text needs the optional
extra ``pip install 'ds-quant[calib]'`` (imported here lazily, with an error naming the extra).
``builtin`` alone means the train split for calibration and the validation split for eval.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ds_quant.errors import DsQuantError

EOS = "<|endoftext|>"


def _ds_data(flag: str) -> ModuleType:
    try:
        import ds_data
        import ds_data.corpus
    except ImportError:
        raise DsQuantError(
            f"{flag}: reading calibration / evaluation text needs ds-data: pip install 'ds-quant[calib]'"
        ) from None
    return ds_data


def read_texts(source: str, *, flag: str = "--calib", default_split: str = "train") -> list[str]:
    """Documents of a text source (see the module docstring), read by ds-data."""
    ds_data = _ds_data(flag)
    try:
        if source == "builtin" or source.startswith("builtin:"):
            split = source.partition(":")[2] or default_split
            corpus = ds_data.load_corpus("builtin")
            if split not in corpus:
                raise DsQuantError(f"{flag}: {source}: unknown split; expected one of {', '.join(corpus)}")
            return list(corpus[split]["text"])
        return ds_data.corpus.read_text_file(str(source))
    except ds_data.DsDataError as e:  # names the file (and line); the flag says which input it was
        raise DsQuantError(f"{flag}: {e} (expected a .txt or .jsonl file, or 'builtin')") from None


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
