"""Training data: ds-data corpus -> tokenizer -> packed sequences, and a resumable sampler.

The sampler is what makes resume exact. Each epoch has one seeded permutation of the packed
sequences; optimizer step ``s`` of the epoch consumes the ``global_batch`` consecutive entries
starting at ``offset + s * global_batch``, split into micro-batches and ranks. The data position is
therefore three numbers (epoch, sequences consumed in the epoch, seed), and skipping to it costs
nothing: no batches are drawn and thrown away. Which rank sees which sequence does not change the
gradient of a step (the loss is normalised over the whole window), so a resume may use a different
number of processes as long as the global batch stays the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds_trainer.config import DataConfig
from ds_trainer.errors import TrainerError


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset (or any map-style dataset of {"input_ids": (seq_len + 1,)})
    eval: Any | None
    tokenizer: Any | None  # tokenizers.Tokenizer
    fingerprints: dict


def resolve_tokenizer(config: DataConfig, model_dir: Path | None, output_dir: Path, corpus, vocab_size: int):
    """The tokenizer named by ``data.tokenizer``; "auto" = the model directory's, else the one a
    previous run of this output_dir trained, else train a byte-level BPE on the training split."""
    from tokenizers import Tokenizer

    import ds_data

    if config.tokenizer != "auto":
        path = Path(config.tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TrainerError(f"data.tokenizer: {config.tokenizer}: no tokenizer.json there")
        tok = Tokenizer.from_file(str(path))
    elif model_dir is not None and (model_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    elif (output_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(output_dir / "tokenizer.json"))
    else:
        tok = ds_data.train_tokenizer(corpus["train"], vocab_size, str(output_dir / "tokenizer.json"))
    if tok.get_vocab_size() > vocab_size:
        raise TrainerError(
            f"data.tokenizer: vocabulary of {tok.get_vocab_size()} tokens does not fit the model's "
            f"vocab_size {vocab_size}"
        )
    return tok


def prepare_data(
    config: DataConfig, *, model_dir: Path | None, output_dir: Path, vocab_size: int, max_seq_len: int
) -> PreparedData:
    """Load the corpus, resolve the tokenizer and pack both splits at ``seq_len + 1`` tokens (the
    model sees ``seq_len`` inputs, the extra token is the last target)."""
    import ds_data

    if config.seq_len > max_seq_len:
        raise TrainerError(f"data.seq_len: {config.seq_len} exceeds the model's max_seq_len {max_seq_len}")
    for item in config.corpus:
        if item != "builtin" and not os.path.isfile(item):
            raise TrainerError(f"data.corpus: {item}: file not found")
    try:
        corpus = ds_data.load_corpus(
            config.corpus[0] if config.corpus == ["builtin"] else list(config.corpus)
        )
        tok = resolve_tokenizer(config, model_dir, output_dir, corpus, vocab_size)
        train = ds_data.pack(corpus["train"], tok, config.seq_len + 1, num_proc=config.num_proc)
        val = corpus.get("validation")
        evald = ds_data.pack(val, tok, config.seq_len + 1) if val is not None and val.num_rows else None
    except ds_data.DsDataError as e:
        raise TrainerError(f"data: {e}") from None
    if config.max_train_sequences:
        train = train.select(range(min(config.max_train_sequences, train.num_rows)))
    if evald is not None and config.max_eval_sequences:
        evald = evald.select(range(min(config.max_eval_sequences, evald.num_rows)))
    if evald is not None and evald.num_rows == 0:
        evald = None
    fingerprints = {
        "corpus": list(config.corpus),
        "train": ds_data.fingerprint(train),
        "eval": ds_data.fingerprint(evald) if evald is not None else None,
        "seq_len": config.seq_len,
    }
    return PreparedData(
        train.with_format("torch"), evald.with_format("torch") if evald else None, tok, fingerprints
    )


class StepBatchSampler:
    """Yields this rank's micro-batches (lists of indices), ``accum`` per optimizer step, starting
    at the data position; see the module docstring for the order."""

    def __init__(
        self,
        num_samples: int,
        micro_batch: int,
        accum: int,
        world_size: int,
        rank: int,
        seed: int,
        epoch: int = 0,
        offset: int = 0,
    ):
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.accum = accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = micro_batch * accum * world_size
        if num_samples < self.global_batch:
            raise TrainerError(
                f"data: {num_samples} training sequences are fewer than one global batch of "
                f"{self.global_batch} (micro_batch_size x grad_accum_steps x processes); "
                "lower data.micro_batch_size or data.seq_len, or add data"
            )
        self.epoch = epoch
        self.offset = offset  # sequences of this epoch already consumed

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def advance(self) -> None:
        """Mark one optimizer step's global batch as consumed (rolls over to the next epoch)."""
        self.offset += self.global_batch
        if self.offset + self.global_batch > self.num_samples:
            self.epoch += 1
            self.offset = 0

    def step_batches(self) -> list[list[int]]:
        """The ``accum`` micro-batches of this rank for the current optimizer step."""
        perm = self.permutation(self.epoch)
        start = self.offset
        out = []
        for m in range(self.accum):
            lo = start + (m * self.world_size + self.rank) * self.micro_batch
            out.append(perm[lo : lo + self.micro_batch].tolist())
        return out


def collate(dataset, indices: list[int]) -> torch.Tensor:
    """(B, seq_len + 1) int64 token ids."""
    if hasattr(dataset, "column_names"):  # datasets.Dataset: one batched read
        rows = dataset[indices]["input_ids"]
    else:  # any map-style dataset of {"input_ids": ...} rows
        rows = [dataset[i]["input_ids"] for i in indices]
    ids = rows if isinstance(rows, torch.Tensor) else torch.stack([torch.as_tensor(r) for r in rows])
    return ids.long()


def iterate_eval(
    dataset, micro_batch: int, world_size: int, rank: int, max_batches: int
) -> Iterator[torch.Tensor]:
    """Evaluation batches of this rank, in order (every rank gets the same count)."""
    n = len(dataset)
    per_round = micro_batch * world_size
    rounds = min(max_batches, max(1, n // per_round)) if n >= per_round else 0
    for r in range(rounds):
        lo = r * per_round + rank * micro_batch
        yield collate(dataset, list(range(lo, lo + micro_batch)))
    if rounds == 0 and rank == 0 and n:  # tiny eval split: the main process evaluates it whole
        yield collate(dataset, list(range(n)))
