"""Triton kernels for adaptive block-sparse attention (semantics: ``reference_attention.py``).

Decode (one query token over a KV cache of S keys) is memory bound and short. Three paths, one
per kind of row (``DECODE_TUNING["path"]`` forces one):

- GQA (several query heads per KV head, few blocks kept per row): the "coop" path,
  ``triton_coop.py``. One launch: P programs per row score their share of the blocks, meet at
  the row's barrier, each finds the row's exact top-``count`` and attends to its share.
- MHA (one query head per KV head, most blocks kept): the "rank" path, ``triton_rank.py``. The
  scores kernel only scores, and each attention program owns a slice of W key blocks, ranks
  them against the row's scores (rank = #higher + #equal with a lower index; kept iff
  rank < count, exactly the top-k) and attends to its kept ones.
- The "ticket" path of this file (the GQA default until session 5), two launches:

  1. ``_decode_scores_kernel``: block scores ``sum_g q_g . pooled_k[j]`` for every key block of
     every GQA group (``_score_blocks``), sinks and local window forced to +inf; reads only the
     pooled-key cache (S / bs rows), in parallel over blocks. The row's last program to finish
     (an atomic ticket) then selects the exact top-``count`` (``_top_keep``: bisection on
     order-preserving integer keys, ties to the lower block), written as an ascending list of
     block indices (``_select_row``; also a launch of its own, ``_select_kernel``).
  2. ``_decode_attn_kernel``: flash-decoding split over the kept blocks; all query heads of the
     group are the M side of the dot, so each kept K/V block is read once per group, not once
     per head. Each program publishes a partial (max, sum, numerator); the row's last program
     to finish (an atomic ticket) merges them, so there is no third launch.

Short rows of a device-length decode (a small cache) are scored, selected and attended by one
program per row in the scores kernel (``ATTN``). Variants measured and removed
(docs/benchmarks/ds-core.md has the numbers): programmatic dependent launch between the kernels
(small, mixed), the ticket kernel's index slice preloaded into registers (slower), the rank
kernel attending through a stored list, one fused program per row walking its whole pooled row
(serial and latency bound), and, for the coop path, register-held tiles, a merge of all
partials at once, a parallel merge behind a second barrier and a four-way bisection.

Prefill is ``triton_prefill.py`` (flash attention over each query block's kept key blocks); its
block scores and selection are small matrix ops done in PyTorch. ``sparse_attention_triton`` at
the end of this file dispatches between them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ds_core.config import DsCoreError
from ds_core.kernels.reference_attention import block_scores, pool_keys, select_blocks
from ds_core.kernels.triton_common import (
    DECODE_TUNING,
    _attend_blocks,
    _group_qsum,
    _group_query,
    _publish_merge,
    _row_keys,
    _score_blocks,
    _ticket_buffer,
    _top_keep,
)
from ds_core.kernels.triton_common import num_sms as _num_sms
from ds_core.kernels.triton_common import precision as _precision
from ds_core.kernels.triton_coop import coop_decode, use_coop
from ds_core.kernels.triton_prefill import block_sparse_prefill
from ds_core.kernels.triton_rank import rank_decode, use_rank

MAX_SELECT_BLOCKS = 1 << 16  # _select_kernel holds a row of scores in registers
# dynamic-length decode: caches of at most 64 blocks that keep at most this many are scored,
# selected and attended by one program per row (one launch); longer ones split the attention
FUSED_MAX_BLOCKS = 16


# --------------------------------------------------------------------------------------------
# decode: block scores
# --------------------------------------------------------------------------------------------


@triton.jit
def _decode_scores_kernel(
    Q, P, OUT,
    s_qb, s_qh, s_qd,
    s_pb, s_ph, s_pn, s_pd,
    Hkv, n_pooled, n_blocks, qblock, sink_blocks, local_blocks,
    IDX, TICKET, count, s_ir,
    K, s_kb, s_kh, s_ks, s_kd, START, LEN, s_len, TABLE,
    V, s_vb, s_vh, s_vs, s_vd, Out, s_ob, s_oh, s_od, sm_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SELECT: tl.constexpr, NB: tl.constexpr,
    BS: tl.constexpr, DYN: tl.constexpr, ATTN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (batch, KV head): one GQA group
    b = row // Hkv
    h = row % Hkv
    st = 0
    n_valid = 0
    if DYN:
        # the valid keys of this row are slots [start, length), read on the device: the step can
        # be captured once and replayed at every length (blocks count from the row's first key)
        st, n_valid, _, count = _row_keys(START, LEN, s_len, TABLE, b, BS)
        qblock = (n_valid - 1) // BS
    j, score = _score_blocks(
        _group_qsum(Q, b, h, s_qb, s_qh, s_qd, G, G_PAD, D, BLOCK_D), P, K, b, h, tl.program_id(1) * BLOCK_N,
        s_pb, s_ph, s_pn, s_pd, s_kb, s_kh, s_ks, s_kd, n_pooled, n_blocks, qblock, sink_blocks, local_blocks,
        st, n_valid, D, BLOCK_D, BLOCK_N, BS, CAUSAL, DYN,
    )  # fmt: skip
    tl.store(OUT + row * n_blocks + j, score, mask=j < n_blocks)
    if ATTN:
        # a short row (one program holds all its blocks): select and attend here, one launch in
        # all (dynamic-length decode of a small cache, where two launches cost more than the keys)
        tl.debug_barrier()
        _select_row(OUT, IDX, row, n_blocks, count, s_ir, NB, True)
        tl.debug_barrier()
        q, m_i, l_i, acc = _group_query(Q, b, h, s_qb, s_qh, s_qd, G, G_PAD, D, BLOCK_D)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, BLOCK_D)
        m_i, l_i, acc = _attend_blocks(
            q, K + b * s_kb + h * s_kh + st * s_ks, V + b * s_vb + h * s_vh + st * s_vs, IDX + row * s_ir,
            0, count, n_valid, n_valid - 1, s_ks, s_kd, s_vs, s_vd, sm_scale * 1.4426950408889634,
            m_i, l_i, acc, BLOCK_D, D, BS, True, PRECISION,
        )  # fmt: skip
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptr = Out + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :] * s_od
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=(g < G)[:, None] & (d < D)[None, :])
    elif SELECT:
        # the row's last program to finish selects its top `count` blocks (no second launch);
        # the barrier + acq_rel ticket publish every program's scores first
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKET + row, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:
            _select_row(OUT, IDX, row, n_blocks, count, s_ir, NB, True)
            tl.atomic_xchg(TICKET + row, 0)  # ready for the next launch (and CUDA-graph replays)


def decode_block_scores(
    q: Tensor,
    pooled_k: Tensor,
    *,
    block_size: int,
    q_start: int,
    n_blocks: int,
    causal: bool,
    sink_blocks: int,
    local_blocks: int,
) -> Tensor:
    """Masked block scores for one query token: (B, Hkv, 1, n_blocks) float32 (+inf forced).

    Same values as ``reference_attention.block_scores`` for Tq = 1; reads only the pooled keys.
    """
    return _decode_scores(
        q, pooled_k, None, block_size, q_start, n_blocks, causal, sink_blocks, local_blocks, None
    )[0]


def decode_top_blocks(
    q: Tensor,
    pooled_k: Tensor,
    count: int,
    *,
    block_size: int,
    q_start: int,
    n_blocks: int,
    causal: bool,
    sink_blocks: int,
    local_blocks: int,
    num_warps: int | None = None,
) -> Tensor:
    """Block scores and the top-``count`` selection in one launch: indices (B, Hkv, 1, count) int32.

    The same set as ``select_top_blocks(decode_block_scores(...), count)``: the last program of
    each row to finish its scores selects the row (an atomic ticket, as in the attention kernel).
    """
    if n_blocks > MAX_SELECT_BLOCKS:
        raise DsCoreError(f"n_blocks: at most {MAX_SELECT_BLOCKS} blocks, got {n_blocks}")
    return _decode_scores(
        q, pooled_k, count, block_size, q_start, n_blocks, causal, sink_blocks, local_blocks, num_warps
    )[1]


def _decode_scores(
    q, pooled_k, count, block_size, q_start, n_blocks, causal, sink_blocks, local_blocks, num_warps
):
    B, Hq, _, D = q.shape
    Hkv = pooled_k.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, Hkv, 1, n_blocks, device=q.device, dtype=torch.float32)
    select = count is not None
    idx = torch.empty(B, Hkv, 1, count if select else 1, device=q.device, dtype=torch.int32)
    NB = max(16, triton.next_power_of_2(n_blocks))
    BLOCK_N = 64
    count = count if select else 1
    _decode_scores_kernel[(B * Hkv, triton.cdiv(n_blocks, BLOCK_N))](
        q, pooled_k, out,
        q.stride(0), q.stride(1), q.stride(3),
        pooled_k.stride(0), pooled_k.stride(1), pooled_k.stride(2), pooled_k.stride(3),
        Hkv, min(pooled_k.shape[2], n_blocks), n_blocks, q_start // block_size, sink_blocks, local_blocks,
        idx, _ticket_buffer(q.device, B * Hkv, "select"), count, count,
        q, 0, 0, 0, 0, idx, idx, 0, idx,  # K / START / LEN / TABLE: the dynamic-length mode only
        q, 0, 0, 0, 0, q, 0, 0, 0, 1.0,  # V / Out / sm_scale: its fused short-row attention only
        G=G, G_PAD=triton.next_power_of_2(G), D=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_N=BLOCK_N, CAUSAL=causal, SELECT=select, NB=NB, BS=16, DYN=False, ATTN=False, PRECISION="ieee",
        num_warps=num_warps or (_fused_select_warps(NB) if select else _select_warps(NB)),
    )  # fmt: skip
    return out, idx


# --------------------------------------------------------------------------------------------
# decode: exact top-k selection
# --------------------------------------------------------------------------------------------


@triton.jit
def _select_row(SC, IDX, row, n_blocks, count, s_ir, NB: tl.constexpr, CG: tl.constexpr):
    """Write the ``count`` largest of row ``row`` of SC (ties to the lower index) as ascending
    indices, to IDX + row * s_ir."""
    j = tl.arange(0, NB)
    if CG:  # written by other programs of this launch: read from L2, L1 may hold stale lines
        x = tl.load(SC + row * n_blocks + j, mask=j < n_blocks, other=float("-inf"), cache_modifier=".cg")
    else:
        x = tl.load(SC + row * n_blocks + j, mask=j < n_blocks, other=float("-inf"))
    keep = _top_keep(x, count)
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(IDX + row * s_ir + slot, j, mask=keep)


@triton.jit
def _select_kernel(SC, IDX, n_blocks, count, NB: tl.constexpr):
    _select_row(SC, IDX, tl.program_id(0), n_blocks, count, count, NB, False)


def _select_warps(NB: int) -> int:
    return 4 if NB <= 2048 else 8


def _fused_select_warps(NB: int) -> int:
    # scores + selection in one launch: 8 warps measured 13.9 vs 16.4 us (4 warps) at 512 blocks
    # and equal (15.9 / 15.7) at 1024 (H100, bf16, 8 rows)
    return 8


def select_top_blocks(scores: Tensor, count: int) -> Tensor:
    """Indices (rows..., count) int32 of the ``count`` largest scores of each row, ascending.

    The same set as ``scores.topk(count)`` (ties go to the lower index). A row is held in
    registers, so rows are limited to MAX_SELECT_BLOCKS blocks (4M keys at block size 64).
    """
    *lead, n = scores.shape
    if n > MAX_SELECT_BLOCKS:
        raise DsCoreError(f"scores: rows of at most {MAX_SELECT_BLOCKS} blocks, got {n}")
    rows = scores.reshape(-1, n)
    out = torch.empty(*lead, count, device=scores.device, dtype=torch.int32)
    NB = max(16, triton.next_power_of_2(n))
    _select_kernel[(rows.shape[0],)](rows, out, n, count, NB=NB, num_warps=_select_warps(NB))
    return out


# --------------------------------------------------------------------------------------------
# decode: split-K attention over the kept blocks
# --------------------------------------------------------------------------------------------


@triton.jit
def _decode_attn_kernel(
    Q, K, V, IDX, OP, ML, Out, TICKET,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_od,
    s_ir,
    sm_scale, Hkv, S, qpos, count, per_split,
    START, LEN, s_len, TABLE,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BS: tl.constexpr, N_SPLITS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    DYN: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (batch, KV head): one GQA group
    split = tl.program_id(1)  # which slice of the row's kept blocks
    b = row // Hkv
    h = row % Hkv
    if DYN:  # row b holds its keys in slots [start, length) (device values); see the scores kernel
        st, S, qpos, count = _row_keys(START, LEN, s_len, TABLE, b, BS)
        K += st * s_ks
        V += st * s_vs
    q, m_i, l_i, acc = _group_query(Q, b, h, s_qb, s_qh, s_qd, G, G_PAD, D, BLOCK_D)
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    lo = split * per_split
    hi = tl.minimum(lo + per_split, count)
    m_i, l_i, acc = _attend_blocks(
        q, k_base, v_base, IDX + row * s_ir, lo, hi, S, qpos, s_ks, s_kd, s_vs, s_vd, qk_scale,
        m_i, l_i, acc, BLOCK_D, D, BS, CAUSAL, PRECISION,
    )  # fmt: skip
    # publish the partial (all G_PAD rows); the row's last program to finish merges (a running
    # merge: flash-decoding without a second launch)
    _publish_merge(
        OP, ML, Out, TICKET, row, split, b, h, m_i, l_i, acc, s_ob, s_oh, s_od,
        G, G_PAD, G_PAD, D, BLOCK_D, N_SPLITS, N_SPLITS, 1,
    )  # fmt: skip


def block_sparse_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    *,
    block_size: int,
    q_start: int,
    causal: bool = True,
    n_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    dynamic: tuple | None = None,
) -> Tensor:
    """Attention of one query token (q (B, Hq, 1, D)) over the kept blocks ``indices``.

    ``indices`` (B, Hkv, [1,] count): every listed block is used, in any order. ``dynamic``
    (internal, ``dynamic_decode``): (start, length, length stride, count table) on the device;
    each row then uses the first table[visible blocks] entries of its list, row-relative.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, rows = Hq // Hkv, B * Hkv
    count = indices.shape[-1]
    idx = indices.reshape(rows, count)
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    if n_splits is None:  # two programs per SM (one wave, no straggling partial wave), >= 1 block each
        n_splits = max(1, min(count, 2 * _num_sms(q.device) // rows))
        if block_size <= 64:
            # small blocks: four per program, three stages deep (H100, 32 blocks of 64 keys, 8
            # rows: 14.9 us against 16.9 us for one block per program; 128-key blocks keep one)
            n_splits = max(1, min(n_splits, count // 4))
    if num_stages is None:
        num_stages = 3 if block_size <= 64 else 2
    n_splits = DECODE_TUNING["splits"] or n_splits
    per_split = triton.cdiv(count, n_splits)
    n_splits = triton.cdiv(count, per_split)
    G_PAD, BLOCK_D = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D))
    if num_stages > 1 and 2 * block_size * BLOCK_D * q.element_size() * num_stages > 160 * 1024:
        num_stages = 1  # K and V tiles of every stage must fit in shared memory
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    o_part = torch.empty(rows, n_splits, G_PAD, BLOCK_D, device=q.device, dtype=torch.float32)
    ml = torch.empty(rows, n_splits, 2, G_PAD, device=q.device, dtype=torch.float32)
    _decode_attn_kernel[(rows, n_splits)](
        q, k, v, idx, o_part, ml, out, _ticket_buffer(q.device, rows),
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        idx.stride(0),
        1.0 / math.sqrt(D), Hkv, S, q_start, count, per_split,
        *((idx, idx, 0, idx) if dynamic is None else dynamic),
        G=G, G_PAD=G_PAD, D=D, BLOCK_D=BLOCK_D, BS=block_size, N_SPLITS=n_splits,
        CAUSAL=causal, PRECISION=_precision(q.dtype), DYN=dynamic is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def dynamic_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    start: Tensor,
    length: Tensor,
    pooled_k: Tensor,
    count_table: Tensor,
    max_count: int,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
) -> Tensor:
    """``reference_attention.dynamic_decode_attention`` in two launches, no host sync.

    q (B, Hq, 1, D); k, v the whole fixed-size cache (B, Hkv, S_max, D); ``start`` (B,) and
    ``length`` (B,) (a stride-0 expand is fine) on the device. The scores kernel refreshes the
    pooled row of the latest complete block and selects each row's table[n] blocks into a
    (rows, max_count) list; the attention kernel reads the row's count from the same table.
    Grid sizes depend only on S_max and max_count, so one captured graph serves every length.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n_blocks = triton.cdiv(S, block_size)
    scores = torch.empty(B, Hkv, 1, n_blocks, device=q.device, dtype=torch.float32)
    idx = torch.empty(B, Hkv, 1, max_count, device=q.device, dtype=torch.int32)
    NB = max(16, triton.next_power_of_2(n_blocks))
    BLOCK_N = 64
    s_len = length.stride(0)
    # small caches: one program per row scores, selects and attends (one launch instead of two)
    fused = n_blocks <= BLOCK_N and max_count <= FUSED_MAX_BLOCKS
    if not fused and use_coop(G):
        return coop_decode(
            q,
            k,
            v,
            pooled_k,
            max_count,
            block_size=block_size,
            q_start=0,
            n_blocks=n_blocks,
            causal=True,
            sink_blocks=sink_blocks,
            local_blocks=local_blocks,
            dynamic=(start, length, s_len, count_table),
        )[0]
    rank = not fused and use_rank(G)  # selection by rank in the attention kernel
    G_PAD = max(16, triton.next_power_of_2(G)) if fused else triton.next_power_of_2(G)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype) if fused else q
    _decode_scores_kernel[(B * Hkv, triton.cdiv(n_blocks, BLOCK_N))](
        q, pooled_k, scores,
        q.stride(0), q.stride(1), q.stride(3),
        pooled_k.stride(0), pooled_k.stride(1), pooled_k.stride(2), pooled_k.stride(3),
        Hkv, min(pooled_k.shape[2], n_blocks), n_blocks, 0, sink_blocks, max(1, local_blocks),
        idx, _ticket_buffer(q.device, B * Hkv, "select"), max_count, max_count,
        k, k.stride(0), k.stride(1), k.stride(2), k.stride(3), start, length, s_len, count_table,
        v, v.stride(0), v.stride(1), v.stride(2), v.stride(3), out, out.stride(0), out.stride(1), out.stride(3),
        1.0 / math.sqrt(D),
        G=G, G_PAD=G_PAD, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)) if fused else triton.next_power_of_2(D),
        BLOCK_N=BLOCK_N, CAUSAL=True, SELECT=not rank, NB=NB, BS=block_size, DYN=True, ATTN=fused,
        PRECISION=_precision(q.dtype), num_warps=4 if fused or rank else _fused_select_warps(NB),
    )  # fmt: skip
    if fused:
        return out
    if rank:
        return rank_decode(
            q,
            k,
            v,
            scores,
            max_count,
            block_size=block_size,
            q_start=0,
            dynamic=(start, length, s_len, count_table),
        )[0]
    return block_sparse_decode(
        q,
        k,
        v,
        idx,
        block_size=block_size,
        q_start=0,
        causal=True,
        dynamic=(start, length, s_len, count_table),
    )


# --------------------------------------------------------------------------------------------
# the whole op
# --------------------------------------------------------------------------------------------


def sparse_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    counts: Tensor,
    *,
    block_size: int,
    q_start: int,
    causal: bool,
    sink_blocks: int,
    local_blocks: int,
    pooled_k: Tensor | None,
) -> Tensor:
    """Score, select and attend; ``counts`` (n_qblocks,) from ``block_counts`` (on the CPU)."""
    S = k.shape[2]
    n_blocks = -(-S // block_size)
    if pooled_k is None:
        pooled_k = pool_keys(k, block_size)
    geometry = dict(
        block_size=block_size,
        q_start=q_start,
        n_blocks=n_blocks,
        causal=causal,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
    )
    if q.shape[2] == 1 and n_blocks <= MAX_SELECT_BLOCKS and use_coop(q.shape[1] // k.shape[1]):
        return coop_decode(q, k, v, pooled_k, int(counts[0]), **geometry)[0]
    if q.shape[2] == 1 and n_blocks <= MAX_SELECT_BLOCKS and use_rank(q.shape[1] // k.shape[1]):
        scores = decode_block_scores(q, pooled_k, **geometry)
        return rank_decode(
            q, k, v, scores, int(counts[0]), block_size=block_size, q_start=q_start, causal=causal
        )[0]
    if q.shape[2] == 1 and n_blocks <= MAX_SELECT_BLOCKS:
        indices = decode_top_blocks(q, pooled_k, int(counts[0]), **geometry)
        return block_sparse_decode(q, k, v, indices, block_size=block_size, q_start=q_start, causal=causal)
    scores = block_scores(q, pooled_k, **geometry)
    indices = select_blocks(scores, counts)
    if q.shape[2] == 1:
        return block_sparse_decode(q, k, v, indices, block_size=block_size, q_start=q_start, causal=causal)
    return block_sparse_prefill(
        q, k, v, indices, counts, block_size=block_size, q_start=q_start, causal=causal
    )
