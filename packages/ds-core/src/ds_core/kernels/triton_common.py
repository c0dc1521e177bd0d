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


# Knobs of the decode kernels (triton_attention, triton_rank, triton_coop) that the benchmarks sweep
# (bench_attention.py, bench_decode.py); None: the default. Mutate it, never rebind it.
DECODE_TUNING: dict = {
    # "rank" (triton_rank.py), "ticket" (scores + selection by the row's last program, then the
    # split kernel), "coop" (triton_coop.py: one launch, a barrier per row) or None: rank for
    # MHA, coop for GQA (the fastest on an H100, docs/benchmarks/ds-core.md)
    "path": None,
    "blocks_per_program": None,
    "chunk_blocks": None,
    "num_warps": None,
    "num_stages": None,
    "splits": None,  # "ticket" attention: programs per row
    "rank_chunk": 64,  # rank: row scores compared RC at a time
    "dot": None,  # False: multiply-and-sum on the CUDA cores instead of tl.dot
    "coop_programs": None,  # "coop" (triton_coop.py): programs per row
    "coop_launch": None,  # "coop": False launches without the cooperative-grid attribute
    "coop_merge_unrolled": True,  # "coop": the last program's running merge unrolled (False: a loop)
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


@triton.jit
def _order_key(x):
    """float32 -> int32 with the same order (flip the magnitude bits of negatives)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _top_keep(x, count):
    """Mask of the ``count`` largest entries of the 1-D float32 tensor x, ties to the lower index.

    Bisection for the largest threshold t with #(key >= t) >= count over the int32 order keys,
    stopping early once exactly ``count`` keys reach t (the gap between the count-th and the next
    key is wide in practice, so that takes ~10-20 steps instead of 32); then the ties below the
    count in index order. A radix-16 search (8 steps over a (16, NB) tile) measured slower on
    H100: 15.3 vs 11.6 us."""
    key = _order_key(x)  # int32; the bounds are int64 so that hi - lo cannot overflow
    # search between the finite keys: the forced (+inf) and hidden (-inf) blocks would widen
    # the range by ~2^31 and cost ~5 steps; #(key >= lo) >= count holds at the start
    inf_key = 0x7F800000
    finite = (key < inf_key) & (key > -inf_key - 1)
    n_inf = tl.sum((key >= inf_key).to(tl.int32), axis=0)
    n_fin = tl.sum(finite.to(tl.int32), axis=0)
    lo = tl.min(tl.where(finite, key, inf_key), axis=0).to(tl.int64)
    hi = tl.max(tl.where(finite, key, -inf_key - 1), axis=0).to(tl.int64)
    lo = tl.where(count <= n_inf, inf_key, tl.where(count > n_inf + n_fin, -inf_key - 1, lo))
    hi = tl.where(count <= n_inf, inf_key, tl.where(count > n_inf + n_fin, -inf_key - 1, hi))
    exact = (lo != lo).to(tl.int32)
    while (lo < hi) & (exact == 0):
        mid = lo + ((hi - lo + 1) >> 1)
        n_ge = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
        exact = (n_ge == count).to(tl.int32)
        lo = tl.where(n_ge >= count, mid, lo)
        hi = tl.where(n_ge >= count, hi, mid - 1)
    t = lo.to(tl.int32)
    above = key > t
    tie = key == t
    need = count - tl.sum(above.to(tl.int32), axis=0)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))


@triton.jit
def _group_qsum(Q, b, h, s_qb, s_qh, s_qd, G, G_PAD: tl.constexpr, D, BLOCK_D: tl.constexpr):
    """The query of GQA group (b, h) summed over its heads, float32 (BLOCK_D,): the block scores'
    query (sum_g q_g . pooled_k = (sum_g q_g) . pooled_k)."""
    d = tl.arange(0, BLOCK_D)
    g = tl.arange(0, G_PAD)
    q_ptr = Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :] * s_qd
    qg = tl.load(q_ptr, mask=(g < G)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    return tl.sum(qg, axis=0)


@triton.jit
def _score_blocks(
    qsum, P, K, b, h, j0, s_pb, s_ph, s_pn, s_pd, s_kb, s_kh, s_ks, s_kd,
    n_pooled, n_blocks, qblock, sink_blocks, local_blocks, st, n_valid,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr,
    DYN: tl.constexpr,
):  # fmt: skip
    """(j, scores) of key blocks j = j0 .. j0 + BLOCK_N of GQA group (b, h): qsum . pooled_k[j]
    (qsum from ``_group_qsum``),
    sinks and the local window forced to +inf, blocks the query cannot see -inf. DYN: the row's
    keys are slots [st, st + n_valid) (device values); the latest complete block's mean joins the
    pooled-key cache here (computed from K by the call whose j holds it), so the cache stays
    exact as the length grows."""
    j = j0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    p_ptr = P + b * s_pb + h * s_ph + j[:, None] * s_pn + d[None, :] * s_pd
    pk = tl.load(p_ptr, mask=(j < n_pooled)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    score = tl.sum(pk * qsum[None, :], axis=1)  # (BLOCK_N,)
    if DYN:
        c = n_valid // BS - 1
        if (c >= j0) & (c < j0 + BLOCK_N):
            o = tl.arange(0, BS)
            k_ptr = K + b * s_kb + h * s_kh + (st + c * BS + o)[:, None] * s_ks + d[None, :] * s_kd
            kb = tl.load(k_ptr, mask=(d < D)[None, :], other=0.0).to(tl.float32)  # (BS, BLOCK_D)
            mean = (tl.sum(kb, axis=0) / BS).to(P.dtype.element_ty)
            tl.store(P + b * s_pb + h * s_ph + c * s_pn + d * s_pd, mean, mask=d < D)
            score = tl.where(j == c, tl.sum(mean.to(tl.float32) * qsum, axis=0), score)
    forced = (j < sink_blocks) | ((j <= qblock) & (j > qblock - local_blocks))
    if CAUSAL:
        visible = j <= qblock
    else:
        visible = j < n_blocks
    score = tl.where(forced & visible, float("inf"), score)
    return j, tl.where(visible, score, float("-inf"))


@triton.jit
def _merge_step(OP, ML, part, g, d, m_run, l_run, acc, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold one split's (max, sum, numerator), stored at ``part``, into the running merge."""
    # .cg: read from L2, where the other programs' stores are; L1 may hold stale lines
    m_s = tl.load(ML + (part * 2 + g), cache_modifier=".cg")
    l_s = tl.load(ML + (part * 2 + G_PAD + g), cache_modifier=".cg")
    o_s = tl.load(OP + (part + g)[:, None] * BLOCK_D + d[None, :], cache_modifier=".cg")
    m_new = tl.maximum(m_run, m_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty so far
    alpha = tl.exp2(m_run - m_safe)
    beta = tl.exp2(m_s - m_safe)
    return m_new, l_run * alpha + l_s * beta, acc * alpha[:, None] + o_s * beta[:, None]


@triton.jit
def _merge_splits(
    OP, ML, Out, row, b, h, s_ob, s_oh, s_od,
    G, G_PAD: tl.constexpr, D, BLOCK_D: tl.constexpr, N_SPLITS: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """Combine the row's per-split (max, sum, numerator) into the output (flash-decoding).

    A running merge; UNROLL unrolls it so that every split's loads can go out at once (cheap
    when G_PAD rows are few). Loading every split's (max, sum) at once and the numerators in an
    unrolled loop with 16-row partials measured slower on H100 (attention kernel 20.1 vs 16.9 us
    at 32k).
    """
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    m_run = tl.full([G_PAD], float("-inf"), tl.float32)
    l_run = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    if UNROLL:
        for s in tl.static_range(N_SPLITS):
            part = (row * N_SPLITS + s) * G_PAD
            m_run, l_run, acc = _merge_step(OP, ML, part, g, d, m_run, l_run, acc, G_PAD, BLOCK_D)
    else:
        for s in range(N_SPLITS):
            part = (row * N_SPLITS + s) * G_PAD
            m_run, l_run, acc = _merge_step(OP, ML, part, g, d, m_run, l_run, acc, G_PAD, BLOCK_D)
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]  # padding rows (g >= G) stay finite
    o_ptr = Out + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :] * s_od
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=(g < G)[:, None] & (d < D)[None, :])


@triton.jit
def _attend_blocks(
    q, k_base, v_base, idx, lo, hi, S, qpos, s_ks, s_kd, s_vs, s_vd, qk_scale, m_i, l_i, acc,
    BLOCK_D: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of the query rows q (G_PAD, BLOCK_D) over kept blocks idx[lo:hi]: (m, l, acc).

    One block per step, its index a scalar load (tiles of 2-4 blocks gathered through a vector of
    indices measured slower on H100: 27.8 against 23.2 us for the issue-3 decode at 32k)."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    offs = tl.arange(0, BS)
    for n in range(lo, hi):
        kpos = tl.load(idx + n).to(tl.int64) * BS + offs
        kmask = kpos < S
        if CAUSAL:
            kmask = kmask & (kpos <= qpos)
        k_ptr = k_base + kpos[None, :] * s_ks + d[:, None] * s_kd
        k = tl.load(k_ptr, mask=kmask[None, :] & dmask[:, None], other=0.0)  # (BLOCK_D, BS)
        v_ptr = v_base + kpos[:, None] * s_vs + d[None, :] * s_vd
        v = tl.load(v_ptr, mask=kmask[:, None] & dmask[None, :], other=0.0)  # (BS, BLOCK_D)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # (G_PAD, BS)
        qk = tl.where(kmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _merge_wide(
    OP, ML, Out, row, b, h, s_ob, s_oh, s_od,
    G, GS: tl.constexpr, D, BLOCK_D: tl.constexpr, N_SPLITS, NSP: tl.constexpr,
):  # fmt: skip
    """Combine the row's N_SPLITS partials (max, sum, numerator), all loaded at once."""
    s = tl.arange(0, NSP)
    g = tl.arange(0, GS)
    d = tl.arange(0, BLOCK_D)
    part = (row * N_SPLITS + s)[:, None] * GS + g[None, :]  # (NSP, GS)
    live = (s < N_SPLITS)[:, None] & (g < GS)[None, :]
    # .cg: read from L2, where the other programs' stores are; L1 may hold stale lines
    m = tl.load(
        ML + (part + (row * N_SPLITS + s)[:, None] * GS), mask=live, other=float("-inf"), cache_modifier=".cg"
    )
    l_s = tl.load(
        ML + (part + (row * N_SPLITS + s + 1)[:, None] * GS), mask=live, other=0.0, cache_modifier=".cg"
    )
    o = tl.load(
        OP + part[:, :, None] * BLOCK_D + d[None, None, :],
        mask=live[:, :, None],
        other=0.0,
        cache_modifier=".cg",
    )
    m_max = tl.max(m, axis=0)  # (GS,)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)[None, :])  # (NSP, GS); empty: 0
    l_sum = tl.sum(l_s * w, axis=0)
    out = tl.sum(o * w[:, :, None], axis=0) / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    o_ptr = Out + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :] * s_od
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=(g < G)[:, None] & (d < D)[None, :])


@triton.jit
def _publish_merge(
    OP, ML, Out, TICKET, row, split, b, h, m_i, l_i, acc, s_ob, s_oh, s_od,
    G, G_PAD: tl.constexpr, GS: tl.constexpr, D, BLOCK_D: tl.constexpr, N_SPLITS: tl.constexpr,
    NSP: tl.constexpr, MERGE: tl.constexpr,
):  # fmt: skip
    """Publish this program's partial softmax (rows, N_SPLITS, GS, BLOCK_D) / (rows, N_SPLITS, 2,
    GS); the row's last program to arrive (an atomic ticket) merges them into Out (MERGE 0: every
    partial loaded at once; 1: a running merge; 2: the running merge unrolled) and re-arms the
    ticket. Returns whether this program merged."""
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    part = (row * N_SPLITS + split) * GS
    gmask = g < GS
    tl.store(OP + (part + g)[:, None] * BLOCK_D + d[None, :], acc, mask=gmask[:, None])
    tl.store(ML + (part * 2 + g), m_i, mask=gmask)
    tl.store(ML + (part * 2 + GS + g), l_i, mask=gmask)
    # the barrier + acq_rel atomic publish this program's stores first
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET + row, 1, sem="acq_rel")
    last = ticket == N_SPLITS - 1
    if last:
        if MERGE == 0:
            _merge_wide(OP, ML, Out, row, b, h, s_ob, s_oh, s_od, G, GS, D, BLOCK_D, N_SPLITS, NSP)
        else:  # the same (rows, N_SPLITS, GS, ...) layout
            _merge_splits(OP, ML, Out, row, b, h, s_ob, s_oh, s_od, G, GS, D, BLOCK_D, N_SPLITS, MERGE == 2)
        tl.atomic_xchg(TICKET + row, 0)  # ready for the next launch (and CUDA-graph replays)
    return last
