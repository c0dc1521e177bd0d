"""Helpers shared by the Triton attention kernels (``triton_attention``, ``triton_rank``, ``triton_prefill``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep the CPU tests fast


def precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 dots (tf32 would cost ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else "tf32"


# Knobs of the decode kernels (triton_attention, triton_rank) that the benchmarks sweep
# (bench_attention.py, bench_decode.py); None: the default. Mutate it, never rebind it.
DECODE_TUNING: dict = {
    # "rank" (triton_rank.py), "ticket" (scores + selection by the row's last program, then the
    # split kernel) or None: rank for MHA, ticket for GQA (the faster of the two on H100 / H200,
    # docs/benchmarks/ds-core.md)
    "path": None,
    "blocks_per_program": None,
    "chunk_blocks": None,
    "num_warps": None,
    "num_stages": None,
    "splits": None,  # "ticket" attention: programs per row
    "rank_chunk": 64,  # rank: row scores compared RC at a time
    "dot": None,  # False: multiply-and-sum on the CUDA cores instead of tl.dot
}

_tickets: dict[tuple[torch.device, str], Tensor] = {}


def _ticket_buffer(device: torch.device, rows: int, kind: str = "attn") -> Tensor:
    """Zeroed int32 counters, one per row, that each kernel resets after use (graph-replay safe)."""
    buf = _tickets.get((device, kind))
    if buf is None or buf.numel() < rows:
        buf = torch.zeros(max(rows, 1024), device=device, dtype=torch.int32)
        _tickets[(device, kind)] = buf
    return buf


@triton.jit
def _group_query(
    Q, b, h, s_qb, s_qh, s_qd, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """The query heads of GQA group (b, h) as the M side of the dot, (G_PAD, BLOCK_D) (each K/V block
    is then read once per group), and an empty online-softmax state (m, l, acc)."""
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    q_ptr = Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :] * s_qd
    q = tl.load(q_ptr, mask=(g < G)[:, None] & (d < D)[None, :], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    return q, m_i, l_i, acc


@triton.jit
def _row_keys(START, LEN, s_len, TABLE, b, BS: tl.constexpr):
    """Device-length decode: row b's keys are slots [start, length) (device values). Returns
    (start, valid keys, the query's row-relative position, kept blocks from the count table)."""
    st = tl.load(START + b).to(tl.int64)
    n = tl.load(LEN + b * s_len).to(tl.int64) - st
    count = tl.load(TABLE + (n - 1) // BS + 1).to(tl.int32)
    return st, n, n - 1, count
