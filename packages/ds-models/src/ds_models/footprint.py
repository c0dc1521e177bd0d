"""How big a config is: parameters (counted on the meta device) and memory per precision."""

from __future__ import annotations

import torch

from ds_models.config import ModelConfig

# Bytes per value. int8/int4 are weight-only formats (ds-quant); their per-group scales add ~1-3%.
PRECISIONS = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def count_parameters(config: ModelConfig) -> int:
    """Parameters of `Transformer(config)`, tied weights once, without allocating any memory."""
    from ds_models.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: float) -> float:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_value  # K and V


def footprint_rows(config: ModelConfig, seq_len: int | None = None, batch: int = 1) -> list[dict]:
    """One row per precision: weights, KV cache per token and at seq_len x batch, their total."""
    seq_len = seq_len or config.max_seq_len
    n = count_parameters(config)
    rows = []
    for precision, nbytes in PRECISIONS.items():
        per_token = kv_cache_bytes_per_token(config, nbytes)
        rows.append(
            dict(
                precision=precision,
                weights=n * nbytes,
                kv_per_token=per_token,
                kv_cache=per_token * seq_len * batch,
                total=n * nbytes + per_token * seq_len * batch,
            )
        )
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
