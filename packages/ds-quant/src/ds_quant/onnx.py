"""Run an exported ds model in onnxruntime: logits, and generation with the KV cache.

    from ds_quant.onnx import OnnxModel
    model = OnnxModel("out/ds-small-int4")            # CUDA provider when present, else CPU
    ids = model.generate([[1, 2, 3]], max_new_tokens=20)

Prompts of different lengths are left-padded into one batch (attention_mask 0, positions counted
from each row's first token), exactly like ds_models.generate, so greedy decoding gives the same
tokens as the PyTorch model it was exported from. The exported model.onnx is self-contained: the
ds config, tokenizer and provenance travel in its metadata_props.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ds_models import ModelConfig, ModelError, sample
from ds_quant.errors import DsQuantError
from ds_quant.onnx_export import MODEL_FILE, io_names, read_metadata

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxModel:
    """An exported ds decoder in an onnxruntime session."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        directory = Path(directory)
        path = directory / MODEL_FILE if directory.is_dir() else directory
        if not path.is_file():
            raise DsQuantError(
                f"--onnx: {path}: missing (expected a directory written by ds-quant export --onnx)"
            )
        self.path = path
        self.metadata: dict[str, Any] = read_metadata(path)
        if "ds.config" not in self.metadata:
            raise DsQuantError(f"{path}: metadata_props: ds.config: missing (not exported by ds-quant)")
        try:
            self.config = ModelConfig.from_dict(self.metadata["ds.config"])
        except ModelError as e:
            raise DsQuantError(f"{path}: metadata_props: ds.config: {e}") from None
        self.tokenizer = None
        if isinstance(self.metadata.get("ds.tokenizer"), dict):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_str(json.dumps(self.metadata["ds.tokenizer"]))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or default_providers()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names, self.output_names = io_names(self.config.n_layers)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    # -- one forward --

    def empty_past(self, batch: int) -> list[np.ndarray]:
        c = self.config
        return [np.zeros((batch, c.n_kv_heads, 0, c.head_dim), np.float32) for _ in range(2 * c.n_layers)]

    def forward(
        self,
        input_ids: np.ndarray,  # (B, T) int64
        attention_mask: np.ndarray,  # (B, P + T) int64
        position_ids: np.ndarray,  # (B, T) int64
        past: list[np.ndarray],  # 2 * n_layers arrays (B, K, P, D)
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (B, T, vocab), present: 2 * n_layers arrays (B, K, P + T, D))."""
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        feeds.update(zip(self.input_names[3:], past))
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    def logits(self, input_ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits (B, T, vocab) of unpadded rows, no cache (like Transformer.forward)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        B, T = ids.shape
        positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
        return self.forward(ids, np.ones((B, T), np.int64), positions, self.empty_past(B))[0]

    # -- generation --

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: list[int] | None = None,
        seed: int | None = None,
    ) -> list[list[int]]:
        """New tokens of every row; a row ends after its first stop token (kept). Greedy at temperature 0."""
        rows = [list(map(int, p)) for p in prompts]
        if not rows or any(not r for r in rows):
            raise DsQuantError("prompts: expected at least one non-empty prompt")
        bad = [t for r in rows for t in r if not 0 <= t < self.config.vocab_size]
        if bad:
            raise DsQuantError(
                f"prompts: token {bad[0]} outside the vocabulary [0, {self.config.vocab_size})"
            )
        if max_new_tokens < 1:
            raise DsQuantError(f"--max-new-tokens: expected a positive integer, got {max_new_tokens}")
        B, T = len(rows), max(len(r) for r in rows)
        ids = np.zeros((B, T), np.int64)  # left-padded with token 0 (masked out)
        mask = np.zeros((B, T), np.int64)
        for b, r in enumerate(rows):
            ids[b, T - len(r) :] = r
            mask[b, T - len(r) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        stops = set(stop_tokens or ())
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        logits, past = self.forward(ids, mask, positions, self.empty_past(B))
        for step in range(max_new_tokens):
            tok = sample(torch.from_numpy(logits[:, -1].copy()), temperature, top_k, top_p, generator).numpy()
            for b in range(B):
                if not done[b]:
                    out[b].append(int(tok[b]))
                    done[b] = int(tok[b]) in stops
            if all(done) or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits, past = self.forward(tok[:, None].astype(np.int64), mask, positions, past)
        return out

    def generate_text(self, prompt: str, max_new_tokens: int = 32, **kwargs: Any) -> str:
        """Encode `prompt` with the exported tokenizer, generate, decode the new tokens."""
        if self.tokenizer is None:
            raise DsQuantError(f"{self.path}: has no tokenizer in its metadata; pass token ids to generate()")
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise DsQuantError("--prompt: encodes to no tokens")
        new = self.generate([ids], max_new_tokens, **kwargs)[0]
        return self.tokenizer.decode(new)
