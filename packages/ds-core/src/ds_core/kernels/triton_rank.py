"""Decode by rank: each attention program selects its own kept blocks (the default for MHA).

The scores kernel (``triton_attention._decode_scores_kernel``) only scores; program (row, slice)
of ``_decode_rank_kernel`` owns W key blocks of a row, ranks each against the row's scores
(rank = #higher + #equal at a lower index; kept iff rank < count, which is exactly the
reference top-k with ties to the lower block) and attends to its kept ones in gathered tiles
whose block indices live in registers, so no single program bisects a whole row while the GPU
waits. Partials are merged by the row's last program (an atomic ticket). For GQA the
``triton_attention`` ticket path stays the default (``use_rank``): ranking a row of 512-1024
scores in every program measured slower than one bisection per row. Numbers and the variants
tried: docs/benchmarks/ds-core.md.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ds_core.kernels.triton_common import (
    DECODE_TUNING,
    _group_query,
    _order_key,
    _publish_merge,
    _row_keys,
    _ticket_buffer,
)
from ds_core.kernels.triton_common import precision as _precision


@triton.jit
def _attend_tile(q, k, v, kmask, qk_scale, m_i, l_i, acc, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of the query rows q (G_PAD, BLOCK_D) over a gathered key tile
    k, v (T, BLOCK_D) (kmask (T,): valid keys). DOT=False multiplies and sums on the CUDA cores:
    with one query row (MHA) a tl.dot would use 1 of its 16 rows."""
    if DOT:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (G_PAD, T)
    else:
        qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    qk = tl.where(kmask[None, :], qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _attend_kept(
    q, k_base, v_base, jw, pos, keep, n_keep, S, qpos, s_ks, s_kd, s_vs, s_vd, qk_scale, m_i, l_i, acc,
    BLOCK_D: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, CH: tl.constexpr, CAUSAL: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Online softmax over the blocks jw[i] with keep[i] (W,), taken in the order pos[i] (0 ..
    n_keep - 1), CH blocks per gathered tile: (m, l, acc). The block indices live in registers,
    so no load in the loop feeds an address and the next tiles' K/V loads are issued ahead
    (software pipelining, STAGES deep); an index loaded from memory per block prevents that."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    c_i = tl.arange(0, CH)
    offs = tl.arange(0, BS)
    for c in tl.range(0, tl.cdiv(n_keep, CH), num_stages=STAGES):
        slot = c * CH + c_i  # (CH,)
        hit = (pos[None, :] == slot[:, None]) & keep[None, :]  # (CH, W)
        blk = tl.sum(tl.where(hit, jw[None, :], 0), axis=1)  # (CH,)
        kpos = tl.reshape(blk.to(tl.int64)[:, None] * BS + offs[None, :], [CH * BS])
        kmask = tl.reshape((slot < n_keep)[:, None] & (offs < BS)[None, :], [CH * BS]) & (kpos < S)
        if CAUSAL:
            kmask = kmask & (kpos <= qpos)
        k = tl.load(
            k_base + kpos[:, None] * s_ks + d[None, :] * s_kd, mask=kmask[:, None] & dmask[None, :], other=0.0
        )
        v = tl.load(
            v_base + kpos[:, None] * s_vs + d[None, :] * s_vd, mask=kmask[:, None] & dmask[None, :], other=0.0
        )
        m_i, l_i, acc = _attend_tile(q, k, v, kmask, qk_scale, m_i, l_i, acc, DOT, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _decode_rank_kernel(
    Q, K, V, SC, IDX, OP, ML, Out, TICKET,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_od,
    s_ir,
    sm_scale, Hkv, n_blocks, S, qpos, count,
    START, LEN, s_len, TABLE,
    G: tl.constexpr, G_PAD: tl.constexpr, GS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BS: tl.constexpr, W: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr, N_SPLITS: tl.constexpr,
    NSP: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, DYN: tl.constexpr,
    STAGES: tl.constexpr, RC: tl.constexpr,
):  # fmt: skip
    """Program (row, split) owns key blocks [split * W, split * W + W) of the row: it ranks them
    against the row's scores (SC, written by the scores kernel), attends to those of rank < count
    in tiles of CH blocks, publishes a partial softmax, and the row's last program merges."""
    row = tl.program_id(0)  # (batch, KV head): one GQA group
    split = tl.program_id(1)
    b = row // Hkv
    h = row % Hkv
    if DYN:  # row b holds its keys in slots [start, length) (device values); see the scores kernel
        st, S, qpos, count = _row_keys(START, LEN, s_len, TABLE, b, BS)
        K += st * s_ks
        V += st * s_vs
    jw = split * W + tl.arange(0, W)
    # rank = #(higher score) + #(equal score, lower index): block j is kept iff rank < count,
    # which is exactly the top-count with ties to the lower index; no sort, no bisection
    key_w = _order_key(
        tl.load(SC + row * n_blocks + jw, mask=jw < n_blocks, other=float("-inf"), cache_modifier=".cg")
    )
    # the row in RC-wide pieces (unrolled: the loads go out together), so the (W, RC) compare
    # tiles stay small in registers
    rank = tl.zeros([W], tl.int32)
    for c in tl.static_range(NB // RC):
        ja = c * RC + tl.arange(0, RC)
        key_a = _order_key(
            tl.load(SC + row * n_blocks + ja, mask=ja < n_blocks, other=float("-inf"), cache_modifier=".cg")
        )
        ahead = (key_a[None, :] > key_w[:, None]) | (
            (key_a[None, :] == key_w[:, None]) & (ja[None, :] < jw[:, None])
        )
        rank += tl.sum(ahead.to(tl.int32), axis=1)  # (W,)
    keep = (rank < count) & (jw < n_blocks)
    tl.store(IDX + row * s_ir + rank, jw, mask=keep)  # the selection, in score order (for tests)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1  # the kept blocks, packed in ascending order
    n_keep = tl.sum(keep.to(tl.int32), axis=0)

    q, m_i, l_i, acc = _group_query(Q, b, h, s_qb, s_qh, s_qd, G, G_PAD, D, BLOCK_D)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    m_i, l_i, acc = _attend_kept(
        q, k_base, v_base, jw, pos, keep, n_keep, S, qpos, s_ks, s_kd, s_vs, s_vd, qk_scale, m_i, l_i, acc,
        BLOCK_D, D, BS, CH, CAUSAL, DOT, PRECISION, STAGES,
    )  # fmt: skip
    _publish_merge(
        OP, ML, Out, TICKET, row, split, b, h, m_i, l_i, acc, s_ob, s_oh, s_od,
        G, G_PAD, GS, D, BLOCK_D, N_SPLITS, NSP, 0,
    )  # fmt: skip


def _rank_geometry(G: int, n_blocks: int, block_size: int) -> tuple[int, int, int, int]:
    """(blocks per program W, blocks per tile CH, num_warps, num_stages) of the rank path."""
    t = DECODE_TUNING
    if G == 1:  # MHA: most blocks kept; small slices balance the SMs (W 4 / 8 / 16 measured)
        W, CH, warps, stages = 4, max(1, 64 // block_size), 4, 2
    else:  # GQA: few kept blocks per row; one tile of 128 keys holds a program's share
        W, CH, warps, stages = 64, max(1, 128 // block_size), 4, 2
    W = t["blocks_per_program"] or W
    CH = t["chunk_blocks"] or CH
    W = max(CH, min(W, triton.next_power_of_2(n_blocks)))
    # at most 128 slices per row: the merge holds every slice's partial in registers at once
    W = max(W, triton.next_power_of_2(triton.cdiv(n_blocks, 128)))
    return W, CH, t["num_warps"] or warps, t["num_stages"] or stages


def use_rank(G: int) -> bool:
    """Whether one-token decode of GQA group size G takes the rank path (DECODE_TUNING["path"])."""
    path = DECODE_TUNING["path"]
    return path == "rank" or (path is None and G == 1)


def rank_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scores: Tensor,
    count: int,
    *,
    block_size: int,
    q_start: int,
    causal: bool = True,
    dynamic: tuple | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of one query token over the top-``count`` blocks of ``scores`` (rows, n_blocks).

    Each program ranks its own slice of blocks against the whole row and attends to those of
    rank < count (the same set as ``select_top_blocks``), so no program waits for a selection.
    Returns (out (B, Hq, 1, D), indices (B, Hkv, 1, count) int32 in descending score order).
    ``dynamic`` as in ``block_sparse_decode``: ``count`` is then the table's largest entry.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, rows = Hq // Hkv, B * Hkv
    n_blocks = scores.shape[-1]
    sc = scores.reshape(rows, n_blocks)
    W, CH, num_warps, num_stages = _rank_geometry(G, n_blocks, block_size)
    n_splits = triton.cdiv(n_blocks, W)
    dot = True if DECODE_TUNING["dot"] is None else DECODE_TUNING["dot"]
    NB = max(16, triton.next_power_of_2(n_blocks))
    G_PAD = max(16, triton.next_power_of_2(G)) if dot else triton.next_power_of_2(G)
    GS = triton.next_power_of_2(G)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    idx = torch.empty(B, Hkv, 1, count, device=q.device, dtype=torch.int32)
    o_part = torch.empty(rows, n_splits, GS, BLOCK_D, device=q.device, dtype=torch.float32)
    ml = torch.empty(rows, n_splits, 2, GS, device=q.device, dtype=torch.float32)
    _decode_rank_kernel[(rows, n_splits)](
        q, k, v, sc, idx, o_part, ml, out, _ticket_buffer(q.device, rows),
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        count,
        1.0 / math.sqrt(D), Hkv, n_blocks, S, q_start, count,
        *((idx, idx, 0, idx) if dynamic is None else dynamic),
        G=G, G_PAD=G_PAD, GS=GS, D=D, BLOCK_D=BLOCK_D, BS=block_size, W=W, CH=CH,
        NB=NB, N_SPLITS=n_splits, NSP=triton.next_power_of_2(n_splits),
        CAUSAL=causal, DOT=dot, PRECISION=_precision(q.dtype), DYN=dynamic is not None, STAGES=num_stages,
        RC=min(NB, DECODE_TUNING["rank_chunk"]), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, idx
