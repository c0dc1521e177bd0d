"""Continuous batching over a ds-quant ONNX export (onnxruntime), for `ds-serve --onnx DIR`.

The exported graph (ds_quant.onnx_export) takes the KV cache as explicit tensors: past
(B, K, P, D) per layer in, present (B, K, P + T, D) out, with an attention_mask (B, P + T) whose
zeros mark left padding and per-row position_ids. There is no slot cache inside the graph, so this
engine keeps the running batch's cache itself:

- prefill runs the new prompts together (left-padded, P = 0) and keeps each row's present tensors
  aside;
- decode feeds the batch's past and gets it back one column longer, as long as the set of running
  slots is unchanged (the common step: no copy);
- when a request joins or leaves, the batch is regrouped: every row's cached tokens are copied,
  right-aligned, into new arrays as long as the longest row, the rest masked as left padding.

Left padding is exactly what ds_quant's own OnnxModel.generate uses for a batch of prompts (masked
keys get a zero softmax weight), so a row's greedy tokens do not depend on who shares its batch.
ds-quant is an optional dependency (`pip install ds-serve[onnx]`), imported only here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ds_serve.engine import Engine
from ds_serve.scheduler import ServeError


def load_onnx(directory: str | Path, threads: int | None = None):
    """(ds_quant.OnnxModel, tokenizers.Tokenizer | None) for an ONNX directory, with clear errors."""
    try:
        from ds_quant import DsQuantError, OnnxModel
    except ImportError as e:
        raise ServeError(
            f"--onnx: needs ds-quant and onnxruntime ({e.name or e}); install them with "
            "pip install 'ds-serve[onnx]'"
        ) from None
    try:
        model = OnnxModel(directory, threads=threads)  # CUDA provider when present, else CPU
    except DsQuantError as e:
        raise ServeError(str(e)) from None
    return model, model.tokenizer


class OnnxEngine(Engine):
    """A ds_quant.OnnxModel; the batch's KV cache lives here as numpy arrays."""

    def __init__(self, model, max_len: int | None = None) -> None:
        self.model = model
        self.config = model.config
        self.max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        self.device = torch.device("cpu")  # sampling runs on the host; onnxruntime returns numpy
        self.rows: list[int] = []  # slots of the batch arrays, in row order
        self.past: list[np.ndarray] = model.empty_past(0)  # 2 * n_layers arrays (B, K, P, D)
        self.mask = np.zeros((0, 0), np.int64)  # (B, P): 1 = a cached token, 0 = left padding
        self.prefilled: dict[int, list[np.ndarray]] = {}  # slot -> present (1, K, L, D), not yet batched

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        B, T = len(prompts), max(map(len, prompts))
        ids = np.zeros((B, T), np.int64)  # left-padded like OnnxModel.generate: the last column is real
        mask = np.zeros((B, T), np.int64)
        for b, p in enumerate(prompts):
            ids[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # (B, T)
        logits, present = self.model.forward(ids, mask, positions, self.model.empty_past(B))
        for b, (slot, p) in enumerate(zip(slots, prompts)):
            self.prefilled[slot] = [a[b : b + 1, :, T - len(p) :] for a in present]  # (1, K, L, D)
        return torch.from_numpy(logits[:, -1].astype(np.float32))  # (B, vocab)

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        if slots != self.rows:
            self._regroup(slots)
        B = len(slots)
        mask = np.concatenate([self.mask, np.ones((B, 1), np.int64)], axis=1)  # (B, P + 1)
        logits, self.past = self.model.forward(
            np.asarray(tokens, np.int64)[:, None], mask, np.asarray(positions, np.int64)[:, None], self.past
        )  # fmt: skip
        self.mask = mask
        return torch.from_numpy(logits[:, -1].astype(np.float32))  # (B, vocab)

    def release(self, slot: int) -> None:
        self.prefilled.pop(slot, None)
        if slot in self.rows:  # its row is dropped at the next regroup; the slot may be reused before that
            self.rows[self.rows.index(slot)] = -1

    def _regroup(self, slots: list[int]) -> None:
        """New batch arrays for `slots`: each row's cache right-aligned, left padding masked."""
        where = {s: i for i, s in enumerate(self.rows)}
        sources = []  # per row: (its arrays (K, L, D) per cache tensor, L)
        for s in slots:
            if s in where:
                i = where[s]
                n = int(self.mask[i].sum())  # rows are [0 .. 0, 1 .. 1]: the last n columns are its cache
                sources.append(([a[i, :, a.shape[2] - n :] for a in self.past], n))
            else:
                present = self.prefilled.pop(s)
                sources.append(([a[0] for a in present], present[0].shape[2]))
        B, P = len(slots), max(n for _, n in sources)
        past = [np.zeros((B, a.shape[0], P, a.shape[2]), a.dtype) for a in sources[0][0]]  # (B, K, P, D)
        mask = np.zeros((B, P), np.int64)
        for b, (arrays, n) in enumerate(sources):
            mask[b, P - n :] = 1
            for dst, src in zip(past, arrays):
                dst[b, :, P - n :] = src
        self.rows, self.past, self.mask = list(slots), past, mask
