"""Dense one-token decode attention over a fixed-size KV cache, valid length on the device.

Row b's query (one token, all Hq heads) attends to slots ``kv_start[b] .. kv_length[b] - 1`` of
k, v (B, Hkv, S, D); nothing else of the cache is read. This is what a captured or compiled decode
step needs: the shapes never change between steps, only the length tensor does, and there is no
host sync. SDPA with a mask over all S slots (the torch path) reads every slot and needs the mask
built each step; here a program per (row, KV head, split) streams only the valid slots, and the G
query heads of a GQA group form the M side of one ``tl.dot`` (padded to 16 rows), so K and V are
read once per group.

Short caches (S <= SINGLE_PASS_SLOTS) run in one launch, one program per (row, KV head). Longer
ones split the slots into chunks, one program each, and a second launch merges the partial
softmaxes by their log-sum-exp (flash-decoding). ``DS_CORE_DECODE_SPLIT`` (slots per chunk, a
multiple of 64; 0 = automatic) overrides the choice, for benchmarks.

``ds_core.sparse_attention.dense_decode_attention`` is the entry point (validation, the backend
switch; its ``"torch"`` path, masked SDPA, is the reference). It calls the op defined here,
``torch.ops.ds_core.dense_decode_attention``, a ``torch.library.triton_op``: torch.compile traces
it without a graph break, and a CUDA graph captures it (its only allocations are the output and
the split workspace, of the same sizes every step).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ds_core.kernels.triton_common import num_sms, precision

SINGLE_PASS_SLOTS = 512  # up to this cache size one program per (row, KV head) streams the valid slots
BLOCK_N = 64  # keys per iteration
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, o_ptr, part_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_start, stride_length,
    n_kv_heads, group, n_splits, split_len,
    QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // n_kv_heads
    h = pid % n_kv_heads
    start = tl.load(start_ptr + b * stride_start).to(tl.int32)
    length = tl.load(length_ptr + b * stride_length).to(tl.int32)
    lo = tl.maximum(start, split * split_len)
    hi = tl.minimum(length, split * split_len + split_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < group
    d_ok = d < D
    heads = h * group + g  # query heads of this KV head's group (kv-head-major, as in HF)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    # Every block from lo's aligned start holds at least one valid slot, so m is finite after the
    # first iteration (no -inf - -inf); an empty range (a split past the length) skips the loop.
    for n0 in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = (n >= lo) & (n < hi)
        kb = tl.load(
            k_base + n[:, None] * stride_ks + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0
        )
        s = tl.dot(q, tl.trans(kb), input_precision=PRECISION) * QK_SCALE  # (BLOCK_G, BLOCK_N), log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        vb = tl.load(
            v_base + n[:, None] * stride_vs + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m = m_new

    if SPLIT:
        # Partial result of this chunk, normalised, and its log2-sum-exp (-inf when empty).
        row = (b * n_kv_heads * group + heads) * n_splits + split  # (BLOCK_G,)
        part = acc / tl.maximum(l_sum, 1e-30)[:, None]
        tl.store(part_ptr + row[:, None] * BLOCK_D + d[None, :], part, mask=g_ok[:, None])
        tl.store(lse_ptr + row, m + tl.log2(l_sum), mask=g_ok)
    else:
        out = acc / l_sum[:, None]
        o = o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, o_ptr, n_heads, n_splits, stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # b * n_heads + head
    b = pid // n_heads
    head = pid % n_heads
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < n_splits
    lse = tl.load(lse_ptr + pid * n_splits + s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # empty chunks weigh 0; the first slot's chunk is never empty
    part = tl.load(
        part_ptr + (pid * n_splits + s)[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0
    )
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + b * stride_ob + head * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


def split_len(S: int, B: int, n_kv_heads: int, device: torch.device) -> int:
    """Slots per program: all of them for short caches, else chunks that give ~2 programs per SM."""
    forced = int(os.environ.get("DS_CORE_DECODE_SPLIT", "0") or 0)
    if forced > 0:
        return -(-forced // BLOCK_N) * BLOCK_N
    if S <= SINGLE_PASS_SLOTS:
        return S
    chunks = max(1, 2 * num_sms(device) // (B * n_kv_heads))
    per_chunk = -(-S // chunks)
    return max(256, -(-per_chunk // BLOCK_N) * BLOCK_N)


@torch.library.triton_op("ds_core::dense_decode_attention", mutates_args=())
def dense_decode(q: Tensor, k: Tensor, v: Tensor, start: Tensor, length: Tensor, scale: float) -> Tensor:
    """q (B, Hq, D) with unit last stride, k/v (B, Hkv, S, D) likewise, start/length (B,) int."""
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    chunk = split_len(S, B, Hkv, q.device)
    n_splits = -(-S // chunk)
    block_d = triton.next_power_of_2(D)
    block_g = max(16, triton.next_power_of_2(group))
    if n_splits > 1:
        part = torch.empty((B * Hq * n_splits, block_d), dtype=torch.float32, device=q.device)
        lse = torch.empty((B * Hq * n_splits,), dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out  # unused (SPLIT is off)
    torch.library.wrap_triton(_decode_kernel)[(B * Hkv, n_splits)](
        q, k, v, start, length, out, part, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), start.stride(0), length.stride(0),
        Hkv, group, n_splits, chunk,
        QK_SCALE=scale * _LOG2E, D=D, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=BLOCK_N, SPLIT=n_splits > 1,
        PRECISION=precision(q.dtype), num_warps=4, num_stages=3,
    )  # fmt: skip
    if n_splits > 1:
        torch.library.wrap_triton(_merge_kernel)[(B * Hq,)](
            part, lse, out, Hq, n_splits, out.stride(0), out.stride(1),
            D=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(n_splits), num_warps=4,
        )  # fmt: skip
    return out
