"""Decode in one launch: score, select and attend behind a per-row barrier (the GQA default).

The two-launch ticket path (``triton_attention``: scores, then the row's last scoring program
bisects the row, then the split attention kernel) pays a second kernel ramp between two
latency-bound phases. Here every row gets P programs, all resident at once (rows x P <= SMs, a
cooperative launch), and program (row, p):

1. scores its 1/P of the row's key blocks (``_score_blocks``, the scores kernel's code) and
   stores them;
2. waits at the row's barrier (an arrival counter);
3. loads the whole row of scores and finds the exact top-``count`` itself (``_top_keep``, the
   bisection of the ticket path, run by every program of the row at once);
4. writes its share of the kept blocks (kept slots [p W, p W + W), ascending) to the index
   list, attends to them with the ticket kernel's loop (``_attend_blocks``) and publishes a
   partial softmax; the row's last program merges them (``_publish_merge``, running merge) and
   re-arms the barrier.

In Triton's CPU interpreter programs run one after another, so a barrier would wait forever:
there, and when rows x P exceeds the SMs, the same kernel runs as two launches (PHASE 1, then
PHASE 2). The selection equals ``select_top_blocks`` exactly; semantics are
``reference_attention``'s. H100 numbers and the variants measured and removed (register-held
tiles instead of the list, merging all partials at once, every program merging a slice of the
output behind a second barrier, a four-way bisection): docs/benchmarks/ds-core.md.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

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

# at most this many programs per row (the merge holds every program's partial at once)
MAX_PROGRAMS = 64


@triton.jit
def _clock():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _decode_coop_kernel(
    Q, K, V, P, SC, IDX, OP, ML, Out, ARRIVED, TICKET, TR,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_pb, s_ph, s_pn, s_pd,
    s_ob, s_oh, s_od,
    s_ir,
    sm_scale, Hkv, n_pooled, n_blocks, S, qpos, count, sink_blocks, local_blocks,
    START, LEN, s_len, TABLE,
    G: tl.constexpr, G_PAD: tl.constexpr, GS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BS: tl.constexpr, W_SCORE: tl.constexpr, SCORE_N: tl.constexpr, W: tl.constexpr, NB: tl.constexpr,
    N_SPLITS: tl.constexpr, NSP: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    DYN: tl.constexpr, PHASE: tl.constexpr, TRACE: tl.constexpr, MERGE: tl.constexpr,
):  # fmt: skip
    """PHASE 1: score; 2: select, attend, merge; 3: both, with the row's barrier between."""
    row = tl.program_id(0)  # (batch, KV head): one GQA group
    split = tl.program_id(1)
    b = row // Hkv
    h = row % Hkv
    tr = TR + (row * N_SPLITS + split) * 8  # TRACE (benchmarks): %globaltimer after each phase
    if TRACE:
        tl.store(tr, _clock())
    st = 0
    n_valid = S
    if DYN:  # row b holds its keys in slots [start, length) (device values)
        st, n_valid, qpos, count = _row_keys(START, LEN, s_len, TABLE, b, BS)
    if PHASE != 2:
        qsum = _group_qsum(Q, b, h, s_qb, s_qh, s_qd, G, G_PAD, D, BLOCK_D)
        for c in range(0, W_SCORE, SCORE_N):  # this program's W_SCORE blocks, SCORE_N at a time
            j, score = _score_blocks(
                qsum, P, K, b, h, split * W_SCORE + c, s_pb, s_ph, s_pn, s_pd, s_kb, s_kh, s_ks, s_kd,
                n_pooled, n_blocks, qpos // BS, sink_blocks, local_blocks, st, n_valid,
                D, BLOCK_D, SCORE_N, BS, CAUSAL, DYN,
            )  # fmt: skip
            tl.store(SC + row * n_blocks + j, score, mask=j < n_blocks)
        if TRACE:
            tl.store(tr + 1, _clock())
    if PHASE == 3:
        # the row's barrier: every program of the row has stored its scores (all are resident)
        tl.debug_barrier()
        tl.atomic_add(ARRIVED + row, 1, sem="release")
        while tl.atomic_add(ARRIVED + row, 0, sem="acquire") < N_SPLITS:
            pass
        if TRACE:
            tl.store(tr + 2, _clock())
    if PHASE != 1:
        j = tl.arange(0, NB)
        # .cg: written by the row's other programs; read from L2, L1 may hold stale lines
        x = tl.load(SC + row * n_blocks + j, mask=j < n_blocks, other=float("-inf"), cache_modifier=".cg")
        keep = _top_keep(x, count)
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1  # ascending block order
        mine = keep & (slot >= split * W) & (slot < split * W + W)
        tl.store(IDX + row * s_ir + slot, j, mask=mine)  # this program's share of the selection
        if TRACE:
            tl.store(tr + 3, _clock())
        q, m_i, l_i, acc = _group_query(Q, b, h, s_qb, s_qh, s_qd, G, G_PAD, D, BLOCK_D)
        tl.debug_barrier()  # the list just written, read back by the ticket kernel's loop
        m_i, l_i, acc = _attend_blocks(
            q, K + b * s_kb + h * s_kh + st * s_ks, V + b * s_vb + h * s_vh + st * s_vs, IDX + row * s_ir,
            split * W, tl.minimum(split * W + W, count), n_valid, qpos, s_ks, s_kd, s_vs, s_vd,
            sm_scale * 1.4426950408889634, m_i, l_i, acc, BLOCK_D, D, BS, CAUSAL, PRECISION,
        )  # fmt: skip
        if TRACE:
            tl.store(tr + 4, _clock())
        last = _publish_merge(
            OP, ML, Out, TICKET, row, split, b, h, m_i, l_i, acc, s_ob, s_oh, s_od,
            G, G_PAD, GS, D, BLOCK_D, N_SPLITS, NSP, MERGE,
        )  # fmt: skip
        if last:  # every program of the row has passed the barrier: re-arm it
            tl.atomic_xchg(ARRIVED + row, 0)
        if TRACE:
            tl.store(tr + 5, _clock())
            tl.store(tr + 6, last.to(tl.int64))


def coop_programs(rows: int, n_blocks: int, device: torch.device) -> int:
    """Programs per row: the largest power of two with rows x P <= SMs (all resident), at most
    one per block and MAX_PROGRAMS; DECODE_TUNING["coop_programs"] overrides."""
    p = DECODE_TUNING["coop_programs"]
    if p is None:
        p = 1
        while 2 * p * rows <= _num_sms(device) and 2 * p <= min(MAX_PROGRAMS, n_blocks):
            p *= 2
    return max(1, min(int(p), MAX_PROGRAMS, n_blocks))


def _one_launch(device: torch.device) -> bool:
    # the interpreter runs programs one at a time: a barrier there would never open
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def coop_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pooled_k: Tensor,
    count: int,
    *,
    block_size: int,
    q_start: int,
    n_blocks: int,
    causal: bool,
    sink_blocks: int,
    local_blocks: int,
    dynamic: tuple | None = None,
    trace: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scores, exact top-``count`` selection and attention of one query token in one launch.

    Returns (out (B, Hq, 1, D), indices (B, Hkv, 1, count) int32, ascending). ``dynamic`` as in
    ``triton_attention.block_sparse_decode``: (start, length, length stride, count table) on the
    device; ``count`` is then the table's largest entry and each row uses its own, and the
    pooled row of the latest complete block is refreshed from K (as the scores kernel does).
    ``trace`` (benchmarks, one-launch form only): an int64 (rows, P, 8) buffer that receives
    each program's %globaltimer after each phase (start, scored, barrier, selected, attended,
    done) and whether it merged.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, rows = Hq // Hkv, B * Hkv
    n_split = coop_programs(rows, n_blocks, q.device)
    NB = max(16, triton.next_power_of_2(n_blocks))
    w_score = max(16, triton.next_power_of_2(triton.cdiv(n_blocks, n_split)))
    W = triton.cdiv(count, n_split)
    G_PAD, GS = max(16, triton.next_power_of_2(G)), triton.next_power_of_2(G)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    scores = torch.empty(rows, n_blocks, device=q.device, dtype=torch.float32)
    idx = torch.empty(B, Hkv, 1, count, device=q.device, dtype=torch.int32)
    o_part = torch.empty(rows, n_split, GS, BLOCK_D, device=q.device, dtype=torch.float32)
    ml = torch.empty(rows, n_split, 2, GS, device=q.device, dtype=torch.float32)
    args = (
        q, k, v, pooled_k, scores, idx, o_part, ml, out,
        _ticket_buffer(q.device, rows, "arrive"), _ticket_buffer(q.device, rows),
        out if trace is None else trace,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        pooled_k.stride(0), pooled_k.stride(1), pooled_k.stride(2), pooled_k.stride(3),
        out.stride(0), out.stride(1), out.stride(3),
        count,
        1.0 / math.sqrt(D), Hkv, min(pooled_k.shape[2], n_blocks), n_blocks, S, q_start, count,
        sink_blocks, max(1, local_blocks),
        *((idx, idx, 0, idx) if dynamic is None else dynamic),
    )  # fmt: skip
    meta = dict(
        G=G, G_PAD=G_PAD, GS=GS, D=D, BLOCK_D=BLOCK_D, BS=block_size, W_SCORE=w_score, SCORE_N=min(w_score, 64),
        W=W, NB=NB, N_SPLITS=n_split, NSP=triton.next_power_of_2(n_split), CAUSAL=causal,
        PRECISION=_precision(q.dtype), DYN=dynamic is not None, TRACE=trace is not None,
        MERGE=2 if DECODE_TUNING["coop_merge_unrolled"] else 1,
        num_warps=DECODE_TUNING["num_warps"] or 4, num_stages=DECODE_TUNING["num_stages"] or 2,
    )  # fmt: skip
    grid = (rows, n_split)
    if _one_launch(q.device) and rows * n_split <= _num_sms(q.device):
        coop = DECODE_TUNING["coop_launch"]
        coop = n_split > 1 if coop is None else bool(coop)
        _decode_coop_kernel[grid](*args, PHASE=3, launch_cooperative_grid=coop, **meta)
    else:  # one launch per phase: the launch boundary is the barrier
        _decode_coop_kernel[grid](*args, PHASE=1, **meta)
        _decode_coop_kernel[grid](*args, PHASE=2, **meta)
    return out, idx


def use_coop(G: int) -> bool:
    """Whether one-token decode of GQA group size G takes this path (DECODE_TUNING["path"]):
    the default for GQA (G > 1); MHA takes the rank path (docs/benchmarks/ds-core.md)."""
    path = DECODE_TUNING["path"]
    return path == "coop" or (path is None and G > 1)
