"""Triton kernel of adaptive block-sparse prefill (semantics: ``reference_attention.py``).

``_prefill_kernel`` is flash attention where each program owns one query block of ``HPP`` heads
of a GQA group and iterates only over that block's kept key blocks. The list is ascending and,
under causal masking, ends with the diagonal block, so only the last iteration needs a mask. Its
block scores and selection are small matrix ops done in PyTorch (``triton_attention`` dispatches).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ds_core.config import DsCoreError
from ds_core.kernels.triton_common import precision as _precision


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    Out,
    IDX,
    CNT,
    s_qb,
    s_qh,
    s_qt,
    s_qd,
    s_kb,
    s_kh,
    s_ks,
    s_kd,
    s_vb,
    s_vh,
    s_vs,
    s_vd,
    s_ob,
    s_oh,
    s_ot,
    s_od,
    s_ib,
    s_ih,
    s_iq,
    sm_scale,
    Hkv,
    Tq,
    S,
    q_start,
    first_qblock,
    n_qblocks,
    G: tl.constexpr,
    HPP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qb = n_qblocks - 1 - tl.program_id(0)  # the longest rows (latest query blocks) start first
    pid = tl.program_id(1)
    n_hg: tl.constexpr = G // HPP
    b = pid // (Hkv * n_hg)
    h = (pid // n_hg) % Hkv
    head0 = h * G + (pid % n_hg) * HPP
    # rows of the tile are (head, position) pairs: HPP heads x BS positions of this query block
    r = tl.arange(0, HPP * BS)
    qpos = (first_qblock + qb) * BS + r % BS  # absolute positions
    t = qpos - q_start
    qmask = (t >= 0) & (t < Tq)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(
        Q + b * s_qb + (head0 + r // BS)[:, None] * s_qh + t[:, None] * s_qt + d[None, :] * s_qd,
        mask=qmask[:, None] & dmask[None, :],
        other=0.0,
    )  # (HPP*BS, BLOCK_D)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([HPP * BS], float("-inf"), tl.float32)
    l_i = tl.zeros([HPP * BS], tl.float32)
    acc = tl.zeros([HPP * BS, BLOCK_D], tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    i_base = IDX + b * s_ib + h * s_ih + qb * s_iq
    count = tl.load(CNT + qb)
    offs = tl.arange(0, BS)
    if CAUSAL:
        # every kept block but the last (the diagonal) lies fully before every query: no mask
        n_free = count - 1
    else:
        n_free = 0
    for n in range(0, n_free):
        kpos = tl.load(i_base + n).to(tl.int64) * BS + offs
        k = tl.load(k_base + kpos[None, :] * s_ks + d[:, None] * s_kd, mask=dmask[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * s_vs + d[None, :] * s_vd, mask=dmask[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    for n in range(n_free, count):
        kpos = tl.load(i_base + n).to(tl.int64) * BS + offs
        kmask = kpos < S
        k = tl.load(
            k_base + kpos[None, :] * s_ks + d[:, None] * s_kd, mask=kmask[None, :] & dmask[:, None], other=0.0
        )
        v = tl.load(
            v_base + kpos[:, None] * s_vs + d[None, :] * s_vd, mask=kmask[:, None] & dmask[None, :], other=0.0
        )
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        valid = kmask[None, :]
        if CAUSAL:
            valid = valid & (kpos[None, :] <= qpos[:, None])
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptr = Out + b * s_ob + (head0 + r // BS)[:, None] * s_oh + t[:, None] * s_ot + d[None, :] * s_od
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


def block_sparse_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    counts: Tensor,
    *,
    block_size: int,
    q_start: int,
    causal: bool = True,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> Tensor:
    """Attention of Tq queries over the kept blocks of each query block.

    ``indices`` (B, Hkv, n_qblocks, kmax) and ``counts`` (n_qblocks,) as from ``select_blocks``:
    ascending, and under causal masking the diagonal block last.
    """
    B, Hq, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    first = q_start // block_size
    nqb = indices.shape[2]
    if heads_per_program is None:  # 128-row tiles measured best on H100 (bench_attention.py)
        heads_per_program = max(h for h in (1, 2, 4) if G % h == 0 and h * block_size <= 128)
    if G % heads_per_program:
        raise DsCoreError(f"heads_per_program: {heads_per_program} does not divide the GQA group of {G}")
    if num_warps is None:  # 64-key blocks: 4 warps; 128-key blocks: 8 (bench_attention.py, H100)
        num_warps = 8 if block_size >= 128 else 4
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if num_stages > 1 and 2 * block_size * BLOCK_D * q.element_size() * num_stages > 160 * 1024:
        num_stages = 1  # K and V tiles of every stage must fit in shared memory (228 KB on H100)
    out = torch.empty_like(q)
    cnt = counts.to(device=q.device, dtype=torch.int32)
    grid = (nqb, B * Hq // heads_per_program)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        indices,
        cnt,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        q.stride(3),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        k.stride(3),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        v.stride(3),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        out.stride(3),
        indices.stride(0),
        indices.stride(1),
        indices.stride(2),
        1.0 / math.sqrt(D),
        Hkv,
        Tq,
        S,
        q_start,
        first,
        nqb,
        G=G,
        HPP=heads_per_program,
        D=D,
        BLOCK_D=BLOCK_D,
        BS=block_size,
        CAUSAL=causal,
        PRECISION=_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
