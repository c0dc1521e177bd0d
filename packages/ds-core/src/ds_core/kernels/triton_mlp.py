"""Triton kernels of the dynamic sparse MLP (GPU; CPU too under ``TRITON_INTERPRET=1``).

Row-gather GEMV/GEMM: with the weights laid out (in, out), output ``y = xs @ Wt`` needs row
``k`` of ``Wt`` only where some token has ``|x[:, k]| > threshold``. Two steps:

1. ``_compact_kernel``: per chunk of ``k_split`` rows, the ordered list of rows some token needs
   (a prefix sum over the mask). For the down projection it also forms ``h = silu(g) * u``.
2. ``_gather_gemv_kernel``: each program owns a ``BLOCK_N`` slice of the output and one chunk
   (split-K: enough programs to keep every SM's memory pipe busy at batch 1) and visits only the
   listed rows, so both the bytes read and the instructions issued fall with the ratio (masking
   the loads of a dense loop instead saves bytes but not instructions: measured 1.47x at ratio
   0.5 on an H100, against 1.8x wanted). Partial sums meet in float32 by atomic adds.

Gate and up share their input mask, so one GEMV reads both matrices' rows. Semantics are
``kernels/reference.py``'s ``dynamic_sparse_swiglu`` and ``sparse_gemv``.

Batch 1 multiplies with a broadcast-and-sum (no wasted tensor-core rows); 2..16 tokens use
``tl.dot`` on a 16-row tile. The masked-dense helpers at the bottom are the fallback for batches
whose union of active rows is nearly everything: cuBLAS GEMMs plus one fused masking kernel per
projection input, so the fallback launches no more kernels than the dense layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ds_core.config import DsCoreError
from ds_core.kernels.reference import topk_threshold

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class GatherConfig:
    """Launch shape of one row-gather GEMV (chosen by the H100 sweep in benchmarks/)."""

    block_n: int = 64  # output columns per program
    block_k: int = 32  # active rows gathered per loop step
    k_split: int = 256  # rows of the reduction per program (a power of two): the compaction chunk
    num_warps: int = 4
    num_stages: int = 1  # 1: load then multiply; 2: the next tile's loads overlap this tile's multiply


# Defaults per kernel and token count: the fastest of bench_sparse_mlp.py --sweep on an H100
# (4096 x 11008 bf16, ratio 0.5; flat within ~10% across the good configs).
GATE_UP_CONFIG = {1: GatherConfig(64, 32, 256, 2, 1), 16: GatherConfig(64, 32, 128, 2, 1)}
DOWN_CONFIG = {1: GatherConfig(64, 32, 128, 2, 1), 16: GatherConfig(64, 32, 128, 2, 1)}
# Fuse h / the down row list into the gate+up GEMV and the output cast into the down GEMV (three
# launches instead of five). Off: slower on the H100 both ways it was built. v4 (down chunk = the
# gate/up block width, 64 rows): 75.5 vs 71.1 us at batch 1, ratio 0.5. v5 (the gate/up epilogue
# finishes groups of k_split columns, so the down kernel keeps its 128-row chunk): 87.1 / 67.8 /
# 45.9 us against 85.2 / 66.4 / 45.3 unfused at ratio 0.3 / 0.5 / 0.7 (fused="cast", only the
# down epilogue: 86.3 / 67.5 / 45.9) - the per-program arrival atomics and the serial tail of
# the last-arriving programs cost more than the launches they save inside a CUDA graph.
FUSED = {1: False, 16: False}


# Batch 1 at high ratios: each row chunk holds few active rows, so longer chunks (fewer programs,
# fewer atomic adds) win. H100, ratio 0.7, whole layer: 45.0 us against 46.8 us with the
# defaults above (same run); at ratio 0.5 the defaults stay best (65.8 vs 66.6 us).
HIGH_RATIO = 0.6
GATE_UP_CONFIG_HIGH_RATIO = GatherConfig(64, 32, 512, 2, 1)
DOWN_CONFIG_HIGH_RATIO = GatherConfig(64, 32, 256, 2, 1)


def _pick(table: dict[int, GatherConfig], n_tok: int) -> GatherConfig:
    return table[1] if n_tok == 1 else table[16]


def _pick_layer(n_tok: int, ratio: float) -> tuple[GatherConfig, GatherConfig]:
    """(gate/up, down) launch configs of the row-gather layer for this batch and ratio."""
    if n_tok == 1 and ratio >= HIGH_RATIO:
        return GATE_UP_CONFIG_HIGH_RATIO, DOWN_CONFIG_HIGH_RATIO
    return _pick(GATE_UP_CONFIG, n_tok), _pick(DOWN_CONFIG, n_tok)


@triton.jit
def _compact_kernel(
    x_ptr, u_ptr, t_ptr, h_ptr, idx_ptr, cnt_ptr, zero_ptr,
    B, K, n_zero, zero_per_program, stride_xb, stride_t, stride_hb,
    DTYPE: tl.constexpr, SWIGLU_IN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # Program c lists, in order, the rows k of chunk c (k in [c*CHUNK, (c+1)*CHUNK)) that at least
    # one token needs: idx[c, :cnt[c]]. With SWIGLU_IN the input is h = silu(g) * u from the
    # float32 sums g (x_ptr) and u (u_ptr), rounded as torch rounds it, and h is written to h_ptr
    # for the GEMV. Each program also zeroes its share of the float32 accumulators.
    c = tl.program_id(0)
    offs_k = c * CHUNK + tl.arange(0, CHUNK)
    k_ok = offs_k < K
    need = tl.zeros((CHUNK,), dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        m = b_ok[:, None] & k_ok[None, :]
        off = offs_b[:, None] * stride_xb + offs_k[None, :]
        if SWIGLU_IN:
            g = tl.load(x_ptr + off, mask=m, other=0.0).to(DTYPE).to(tl.float32)
            u = tl.load(u_ptr + off, mask=m, other=0.0).to(DTYPE).to(tl.float32)
            x = ((g * tl.sigmoid(g)).to(DTYPE).to(tl.float32) * u).to(DTYPE)
            tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :], x, mask=m)
        else:
            x = tl.load(x_ptr + off, mask=m, other=0.0)
        t = tl.load(t_ptr + offs_b * stride_t, mask=b_ok, other=float("inf")).to(tl.float32)
        active = (tl.abs(x.to(tl.float32)) > t[:, None]) & m
        need = tl.maximum(need, tl.max(active.to(tl.int32), axis=0))
    pos = tl.cumsum(need, axis=0) - 1
    tl.store(idx_ptr + c * CHUNK + pos, offs_k, mask=need > 0)
    tl.store(cnt_ptr + c, tl.sum(need, axis=0))
    for z0 in range(0, zero_per_program, 1024):
        offs_z = c * zero_per_program + z0 + tl.arange(0, 1024)
        tl.store(
            zero_ptr + offs_z,
            tl.zeros((1024,), dtype=tl.float32),
            mask=(offs_z < n_zero) & (z0 + tl.arange(0, 1024) < zero_per_program),
        )


@triton.jit
def _load_tile(
    x_ptr, w_ptr, idx_ptr, i, cnt, offs_b, b_ok, t, offs_n, n_ok, stride_xb, stride_wk, w2_offset,
    DTYPE: tl.constexpr, TWO_W: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    # Rows i .. i+BLOCK_K of the list: the sparsified inputs (BB, BK) and weight rows (BK, BN).
    # Entries past cnt are masked: they load nothing from memory.
    j = i + tl.arange(0, BLOCK_K)
    j_ok = j < cnt
    rows = tl.load(idx_ptr + j, mask=j_ok, other=0)
    x = tl.load(
        x_ptr + offs_b[:, None] * stride_xb + rows[None, :], mask=b_ok[:, None] & j_ok[None, :], other=0.0
    )
    xs = tl.where(tl.abs(x.to(tl.float32)) > t[:, None], x, 0.0).to(DTYPE)
    if EVEN_N:
        w_mask = j_ok[:, None]
    else:
        w_mask = j_ok[:, None] & n_ok[None, :]
    w_off = rows[:, None] * stride_wk + offs_n[None, :]
    # weights stream through once: evict them first so x, the row lists and the sums stay in L2
    w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0, eviction_policy="evict_first")
    if TWO_W:
        w2 = tl.load(w_ptr + w2_offset + w_off, mask=w_mask, other=0.0, eviction_policy="evict_first")
    else:
        w2 = w
    return xs, w, w2


@triton.jit
def _multiply_tile(acc, acc2, xs, w, w2, IEEE: tl.constexpr, TWO_W: tl.constexpr, BLOCK_B: tl.constexpr):
    if BLOCK_B == 1:  # broadcast-and-add into a (BK, BN) tile; reduced once after the loop
        xv = tl.sum(xs.to(tl.float32), axis=0)[:, None]
        acc += xv * w.to(tl.float32)
        if TWO_W:
            acc2 += xv * w2.to(tl.float32)
    elif IEEE:
        acc = tl.dot(xs, w, acc, input_precision="ieee")
        if TWO_W:
            acc2 = tl.dot(xs, w2, acc2, input_precision="ieee")
    else:
        acc = tl.dot(xs, w, acc)
        if TWO_W:
            acc2 = tl.dot(xs, w2, acc2)
    return acc, acc2


@triton.jit
def _gather_gemv_kernel(
    x_ptr, t_ptr, idx_ptr, cnt_ptr, w_ptr, out_ptr, out2_ptr,
    B, N, stride_xb, stride_t, stride_wk, stride_ob, w2_offset,
    ctr_ptr, e_out_ptr, e_idx_ptr, e_cnt_ptr, e_t_ptr, e_b1_ptr, e_b2_ptr, stride_et, stride_eo, n_chunks,
    DTYPE: tl.constexpr, IEEE: tl.constexpr, TWO_W: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, EVEN_N: tl.constexpr,
    PREFETCH: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, E_CHUNK: tl.constexpr,
):  # fmt: skip
    # out[b, n] += sum over the listed rows k of chunk pid_c of sparsify(x)[b, k] * w[k, n];
    # with TWO_W also out2 from the matrix at w + w2_offset (gate and up share rows and mask).
    # Only listed rows are visited, so loads AND arithmetic scale with the rows kept.
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok = offs_b < B
    n_ok = offs_n < N
    t = tl.load(t_ptr + offs_b * stride_t, mask=b_ok, other=float("inf")).to(tl.float32)
    cnt = tl.load(cnt_ptr + pid_c)
    idx_ptr += pid_c * CHUNK
    acc = tl.zeros((BLOCK_K, BLOCK_N) if BLOCK_B == 1 else (BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N) if BLOCK_B == 1 else (BLOCK_B, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        # Software pipeline: the next tile's weight rows are in flight while this tile is
        # multiplied, so a program keeps two tiles of loads outstanding instead of one.
        xs, w, w2 = _load_tile(
            x_ptr, w_ptr, idx_ptr, 0, cnt, offs_b, b_ok, t, offs_n, n_ok, stride_xb, stride_wk, w2_offset,
            DTYPE, TWO_W, BLOCK_K, EVEN_N,
        )  # fmt: skip
        for i in range(BLOCK_K, cnt + BLOCK_K, BLOCK_K):
            xs_n, w_n, w2_n = _load_tile(
                x_ptr, w_ptr, idx_ptr, i, cnt, offs_b, b_ok, t, offs_n, n_ok, stride_xb, stride_wk, w2_offset,
                DTYPE, TWO_W, BLOCK_K, EVEN_N,
            )  # fmt: skip
            acc, acc2 = _multiply_tile(acc, acc2, xs, w, w2, IEEE, TWO_W, BLOCK_B)
            xs, w, w2 = xs_n, w_n, w2_n
    else:
        for i in range(0, cnt, BLOCK_K):
            xs, w, w2 = _load_tile(
                x_ptr, w_ptr, idx_ptr, i, cnt, offs_b, b_ok, t, offs_n, n_ok, stride_xb, stride_wk, w2_offset,
                DTYPE, TWO_W, BLOCK_K, EVEN_N,
            )  # fmt: skip
            acc, acc2 = _multiply_tile(acc, acc2, xs, w, w2, IEEE, TWO_W, BLOCK_B)
    out = offs_b[:, None] * stride_ob + offs_n[None, :]
    out_mask = b_ok[:, None] & n_ok[None, :]
    if BLOCK_B == 1:
        tl.atomic_add(out_ptr + out, tl.sum(acc, axis=0)[None, :], mask=out_mask, sem="relaxed")
        if TWO_W:
            tl.atomic_add(out2_ptr + out, tl.sum(acc2, axis=0)[None, :], mask=out_mask, sem="relaxed")
    else:
        tl.atomic_add(out_ptr + out, acc, mask=out_mask, sem="relaxed")
        if TWO_W:
            tl.atomic_add(out2_ptr + out, acc2, mask=out_mask, sem="relaxed")
    if EPILOGUE != 0:
        # The last program to finish a group of output columns (a counter per group, zeroed by the
        # compaction kernel) finishes the group, saving a launch:
        # EPILOGUE 1 (gate/up): h = silu(g) * u over E_CHUNK columns (E_CHUNK / BLOCK_N output
        #   blocks, so the down projection keeps its own, larger row chunk) and their row list;
        # EPILOGUE 2 (down): cast the float32 sums of one output block to the output dtype (+ bias).
        tl.debug_barrier()  # every thread's atomics are issued before the release below
        if EPILOGUE == 1:
            per_grp: tl.constexpr = E_CHUNK // BLOCK_N
            grp = pid_n // per_grp
            arrivals = n_chunks * tl.minimum(per_grp, tl.cdiv(N, BLOCK_N) - grp * per_grp)
        else:
            grp = pid_n
            arrivals = n_chunks
        if tl.atomic_add(ctr_ptr + grp, 1, sem="acq_rel") == arrivals - 1:
            if EPILOGUE == 1:
                offs_e = grp * E_CHUNK + tl.arange(0, E_CHUNK)
                e_ok = offs_e < N
                e_mask = b_ok[:, None] & e_ok[None, :]
                src = offs_b[:, None] * stride_ob + offs_e[None, :]
                # .cg: the other programs' sums are in L2; L1 may hold stale lines
                g = tl.load(out_ptr + src, mask=e_mask, other=0.0, cache_modifier=".cg")
                u = tl.load(out2_ptr + src, mask=e_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    g += tl.load(e_b1_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
                    u += tl.load(e_b2_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
                g = g.to(DTYPE).to(tl.float32)
                u = u.to(DTYPE).to(tl.float32)
                h = ((g * tl.sigmoid(g)).to(DTYPE).to(tl.float32) * u).to(DTYPE)
                tl.store(e_out_ptr + offs_b[:, None] * stride_eo + offs_e[None, :], h, mask=e_mask)
                th = tl.load(e_t_ptr + offs_b * stride_et, mask=b_ok, other=float("inf")).to(tl.float32)
                active = (tl.abs(h.to(tl.float32)) > th[:, None]) & e_mask
                need = tl.max(active.to(tl.int32), axis=0)  # (E_CHUNK,)
                tl.store(e_idx_ptr + grp * E_CHUNK + tl.cumsum(need, axis=0) - 1, offs_e, mask=need > 0)
                tl.store(e_cnt_ptr + grp, tl.sum(need, axis=0))
            else:
                y = tl.load(out_ptr + out, mask=out_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    y += tl.load(e_b1_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                e_off = offs_b[:, None] * stride_eo + offs_n[None, :]
                tl.store(e_out_ptr + e_off, y.to(DTYPE), mask=out_mask)


@triton.jit
def _sparsify_kernel(
    x_ptr, u_ptr, t_ptr, out_ptr, N, stride_xb, stride_t, stride_ob,
    SWIGLU_IN: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # out = where(|a| > t, a, 0) with a = x, or a = silu(x) * u (x = gate, u = up, both DTYPE).
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + row * stride_xb + offs, mask=ok, other=0.0)
    if SWIGLU_IN:
        g = x.to(tl.float32)
        u = tl.load(u_ptr + row * stride_xb + offs, mask=ok, other=0.0).to(tl.float32)
        x = ((g * tl.sigmoid(g)).to(DTYPE).to(tl.float32) * u).to(DTYPE)
    t = tl.load(t_ptr + row * stride_t).to(tl.float32)
    out = tl.where(tl.abs(x.to(tl.float32)) > t, x, 0.0).to(DTYPE)
    tl.store(out_ptr + row * stride_ob + offs, out, mask=ok)


# ---------------------------------------------------------------------------------- launchers
def _check(name: str, t: Tensor, ndim: int, ref: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise DsCoreError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise DsCoreError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _TL_DTYPES:
        raise DsCoreError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
    if t.stride(-1) != 1:
        raise DsCoreError(f"{name}: expected contiguous rows (stride 1 in the last dimension)")
    if ref is not None and t.device != ref.device:
        raise DsCoreError(f"{name}: on {t.device}, expected {ref.device} like x")
    if ref is not None and t.dtype != ref.dtype:
        raise DsCoreError(f"{name}: dtype {t.dtype}, expected {ref.dtype} like x")


def _threshold_vector(t: Tensor | float, n_tok: int, like: Tensor, name: str) -> tuple[Tensor, int]:
    """A threshold as (tensor, stride per token): one value (stride 0) or one per token.

    A floating-point tensor already on the device is passed as it is (the kernels widen it to
    float32 as they load it): a module's bf16 threshold buffer then costs no cast kernel per call.
    """
    if not (isinstance(t, Tensor) and t.device == like.device and t.dtype in _TL_DTYPES):
        t = torch.as_tensor(t, device=like.device, dtype=torch.float32)
    if t.numel() == 1:
        return t.reshape(1), 0
    if t.numel() != n_tok:
        raise DsCoreError(
            f"{name}: expected one value or one per token ({n_tok}), got shape {tuple(t.shape)}"
        )
    return t.reshape(n_tok).contiguous(), 1


def _block_b(n_tok: int) -> int:
    return 1 if n_tok == 1 else 16


def _compact(
    x: Tensor,
    t: Tensor,
    stride_t: int,
    chunk: int,
    zero: Tensor,
    u: Tensor | None = None,
    h: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch _compact_kernel: per chunk of rows, the list of rows some token needs, and its length."""
    n_tok, k = x.shape
    n_chunks = triton.cdiv(k, chunk)
    idx = torch.empty(n_chunks * chunk, device=x.device, dtype=torch.int32)
    cnt = torch.empty(n_chunks, device=x.device, dtype=torch.int32)
    dtype = h.dtype if h is not None else x.dtype
    _compact_kernel[(n_chunks,)](
        x, x if u is None else u, t, x if h is None else h, idx, cnt, zero,
        n_tok, k, zero.numel(), triton.cdiv(zero.numel(), n_chunks), x.stride(0), stride_t,
        0 if h is None else h.stride(0),
        DTYPE=_TL_DTYPES[dtype], SWIGLU_IN=u is not None, CHUNK=chunk, BLOCK_B=min(16, triton.next_power_of_2(n_tok)),
    )  # fmt: skip
    return idx, cnt


def _gemv(
    x: Tensor, t: Tensor, stride_t: int, idx: Tensor, cnt: Tensor, wt: Tensor, n: int, out: Tensor,
    out2: Tensor | None, cfg: GatherConfig, chunk: int | None = None, epilogue: int = 0, counters: Tensor | None = None,
    e_out: Tensor | None = None, e_idx: Tensor | None = None, e_cnt: Tensor | None = None,
    e_t: Tensor | None = None, stride_et: int = 0, e_b1: Tensor | None = None, e_b2: Tensor | None = None,
    e_chunk: int | None = None,
) -> None:  # fmt: skip
    """Launch _gather_gemv_kernel over the compacted row lists (out, out2 float32, zeroed).

    ``epilogue`` 1 / 2 finishes the outputs in the kernel (see the kernel); ``counters`` (int32,
    zeroed, one per group of ``e_chunk`` columns for 1, per output block for 2) count the arrivals.
    """
    n_tok = x.shape[0]
    bb = _block_b(n_tok)
    grid = (triton.cdiv(n, cfg.block_n), cnt.numel(), triton.cdiv(n_tok, bb))
    if epilogue and grid[2] != 1:
        raise DsCoreError(f"x: the fused epilogues take at most {bb} tokens, got {n_tok}")
    dummy = out
    _gather_gemv_kernel[grid](
        x, t, idx, cnt, wt, out, out if out2 is None else out2,
        n_tok, n, x.stride(0), stride_t, wt.stride(0), out.stride(0), n,
        dummy if counters is None else counters, dummy if e_out is None else e_out,
        dummy if e_idx is None else e_idx, dummy if e_cnt is None else e_cnt, dummy if e_t is None else e_t,
        dummy if e_b1 is None else e_b1, dummy if e_b2 is None else e_b2, stride_et,
        0 if e_out is None else e_out.stride(0), cnt.numel(),
        DTYPE=_TL_DTYPES[x.dtype], IEEE=x.dtype == torch.float32, TWO_W=out2 is not None, BLOCK_B=bb,
        BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, CHUNK=chunk or cfg.k_split, EVEN_N=n % cfg.block_n == 0,
        PREFETCH=cfg.num_stages >= 2, EPILOGUE=epilogue, HAS_BIAS=e_b1 is not None,
        E_CHUNK=e_chunk or cfg.block_n, num_warps=cfg.num_warps,
    )  # fmt: skip


def sparse_gemv(
    x: Tensor, wt: Tensor, threshold: Tensor | float, config: GatherConfig | None = None
) -> Tensor:
    """``sparsify(x, threshold) @ wt`` reading only needed rows: x (B, K), wt (K, N) -> (B, N) float32."""
    _check("x", x, 2)
    _check("wt", wt, 2, x)
    if wt.shape[0] != x.shape[1]:
        raise DsCoreError(f"wt: expected {x.shape[1]} rows (x has {x.shape[1]} columns), got {wt.shape[0]}")
    n_tok, n = x.shape[0], wt.shape[1]
    t, stride_t = _threshold_vector(threshold, n_tok, x, "threshold")
    cfg = config or _pick(DOWN_CONFIG, n_tok)
    y = torch.empty(n_tok, n, device=x.device, dtype=torch.float32)
    idx, cnt = _compact(x, t, stride_t, cfg.k_split, y)
    _gemv(x, t, stride_t, idx, cnt, wt, n, y, None, cfg)
    return y


def dynamic_swiglu(
    x: Tensor,
    wgu_t: Tensor,
    wd_t: Tensor,
    t_in: Tensor | float,
    t_hidden: Tensor | float | None,
    ratio: float,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    configs: tuple[GatherConfig, GatherConfig] | None = None,
    fused: bool | str | None = None,
) -> Tensor:
    """Dynamic sparse SwiGLU on the row-gather kernels; x (B, d_model) -> (B, d_model) in x's dtype.

    ``wgu_t`` (d_model, 2 d_ff) = [W_gate^T | W_up^T], ``wd_t`` (d_ff, d_model). ``t_hidden=None``
    means per-token top-k on the hidden activations (an uncalibrated module; slower).

    Fused (``fused=True``; off by default, see FUSED; calibrated thresholds, <= 16 tokens): three
    launches, compact x (and zero the sums) / gate+up GEMV whose last program per group of
    ``cfg_d.k_split`` hidden columns forms h there and the down projection's row list / down GEMV
    whose last program per output block writes the output. Unfused: five launches, compact x / gate+up / compact h /
    down / cast. ``fused="cast"``: four, the unfused path with the cast in the down GEMV.
    """
    _check("x", x, 2)
    _check("wgu_t", wgu_t, 2, x)
    _check("wd_t", wd_t, 2, x)
    (n_tok, d_model), d_ff = x.shape, wd_t.shape[0]
    if wgu_t.shape != (d_model, 2 * d_ff) or wd_t.shape != (d_ff, d_model):
        raise DsCoreError(
            f"wgu_t, wd_t: expected shapes ({d_model}, {2 * d_ff}) and ({d_ff}, {d_model}), "
            f"got {tuple(wgu_t.shape)} and {tuple(wd_t.shape)}"
        )
    cfg_gu, cfg_d = configs or _pick_layer(n_tok, ratio)
    if fused is None:
        fused = FUSED[1 if n_tok == 1 else 16]
    cast_in_kernel = fused == "cast" and n_tok <= 16
    fused = fused is True and t_hidden is not None and n_tok <= 16
    t, stride_t = _threshold_vector(t_in, n_tok, x, "t_in")
    # the down projection's row chunk = the gate/up epilogue's column group (a whole number of
    # gate/up output blocks; otherwise one block, the chunk the down kernel then runs with)
    e_chunk = cfg_d.k_split if cfg_d.k_split % cfg_gu.block_n == 0 else cfg_gu.block_n
    n_grp, n_blk_d = triton.cdiv(d_ff, e_chunk), triton.cdiv(d_model, cfg_d.block_n)
    # one float32 buffer, zeroed by the first kernel: g | u | y | arrival counters (int32 zeros)
    acc = torch.empty(n_tok * (2 * d_ff + d_model) + n_grp + n_blk_d, device=x.device, dtype=torch.float32)
    g = acc[: n_tok * d_ff].view(n_tok, d_ff)
    u = acc[n_tok * d_ff : 2 * n_tok * d_ff].view(n_tok, d_ff)
    y = acc[2 * n_tok * d_ff : n_tok * (2 * d_ff + d_model)].view(n_tok, d_model)
    counters = acc[n_tok * (2 * d_ff + d_model) :].view(torch.int32)
    idx, cnt = _compact(x, t, stride_t, cfg_gu.k_split, acc)  # also zeroes acc
    if fused:
        th, stride_th = _threshold_vector(t_hidden, n_tok, x, "t_hidden")
        h = torch.empty(n_tok, d_ff, device=x.device, dtype=x.dtype)
        idx_h = torch.empty(n_grp * e_chunk, device=x.device, dtype=torch.int32)
        cnt_h = torch.empty(n_grp, device=x.device, dtype=torch.int32)
        _gemv(
            x, t, stride_t, idx, cnt, wgu_t, d_ff, g, u, cfg_gu, epilogue=1, counters=counters[:n_grp],
            e_out=h, e_idx=idx_h, e_cnt=cnt_h, e_t=th, stride_et=stride_th, e_b1=b_gate, e_b2=b_up,
            e_chunk=e_chunk,
        )  # fmt: skip
        out = torch.empty(n_tok, d_model, device=x.device, dtype=x.dtype)
        _gemv(
            h, th, stride_th, idx_h, cnt_h, wd_t, d_model, y, None, cfg_d, chunk=e_chunk, epilogue=2,
            counters=counters[n_grp:], e_out=out, e_b1=b_down,
        )  # fmt: skip
        return out
    _gemv(x, t, stride_t, idx, cnt, wgu_t, d_ff, g, u, cfg_gu)
    if b_gate is not None:
        g += b_gate.float()
        u += b_up.float()
    if t_hidden is None:  # per-token top-k needs h in full before the down projection
        h = F.silu(g.to(x.dtype)) * u.to(x.dtype)
        y.copy_(sparse_gemv(h, wd_t, topk_threshold(h, ratio), cfg_d))
    else:
        th, stride_th = _threshold_vector(t_hidden, n_tok, x, "t_hidden")
        h = torch.empty(n_tok, d_ff, device=x.device, dtype=x.dtype)
        idx_h, cnt_h = _compact(g, th, stride_th, cfg_d.k_split, acc[:0], u=u, h=h)
        if cast_in_kernel:  # the down GEMV's last program per output block writes the output
            out = torch.empty(n_tok, d_model, device=x.device, dtype=x.dtype)
            _gemv(
                h, th, stride_th, idx_h, cnt_h, wd_t, d_model, y, None, cfg_d, epilogue=2,
                counters=counters[n_grp:], e_out=out, e_b1=b_down,
            )  # fmt: skip
            return out
        _gemv(h, th, stride_th, idx_h, cnt_h, wd_t, d_model, y, None, cfg_d)
    out = y.to(x.dtype)
    return out if b_down is None else out + b_down


def sparsify(a: Tensor, threshold: Tensor | float, up: Tensor | None = None) -> Tensor:
    """Fused ``where(|a| > t, a, 0)`` for a (B, N); with ``up``, ``a`` is ``silu(a) * up`` first."""
    _check("a", a, 2)
    if up is not None:
        _check("up", up, 2, a)
    n_tok, n = a.shape
    t, stride_t = _threshold_vector(threshold, n_tok, a, "threshold")
    out = torch.empty(n_tok, n, device=a.device, dtype=a.dtype)
    block = 1024 if n >= 1024 else triton.next_power_of_2(n)
    _sparsify_kernel[(n_tok, triton.cdiv(n, block))](
        a, a if up is None else up, t, out, n, a.stride(0), stride_t, out.stride(0),
        SWIGLU_IN=up is not None, DTYPE=_TL_DTYPES[a.dtype], BLOCK=block,
    )  # fmt: skip
    return out


def masked_dense_swiglu(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    t_in: Tensor | float,
    t_hidden: Tensor | float | None,
    ratio: float,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> Tensor:
    """The dense fallback: cuBLAS GEMMs on the sparsified activations (same result as the sparse path)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    xs = sparsify(x, t_in)
    g, u = F.linear(xs, w_gate, b_gate), F.linear(xs, w_up, b_up)
    if t_hidden is None:
        h = F.silu(g) * u
        hs = sparsify(h, topk_threshold(h, ratio))
    else:
        hs = sparsify(g, t_hidden, up=u)
    return F.linear(hs, w_down, b_down)
