"""Batch-1 matrix-vector products for narrow models: y = x @ W.T (+ bias), one row of x.

At batch 1 a decode step is a chain of GEMVs, each reading its weight once; for a narrow model
(d_model 1536) cuBLAS reads the small q/k/v/o and down weights at 0.9-1.9 TB/s, launch latency and
too few blocks dominating (docs/benchmarks/ds-models.md). Here each program owns BLOCK_N output
rows and streams their whole K extent in BLOCK_K chunks, accumulating in float32 registers and
reducing once at the end. Two fusions for the decode step:

- ``bias``: the q/k/v projection's bias is added in the epilogue (cuBLAS's addmm, not rewritten by
  inductor, stays a separate GEMV otherwise);
- ``up``: the down projection's input ``silu(x) * up`` (SwiGLU) is formed in the prologue from the
  gate and up outputs, rounded to the weight dtype like the unfused ops, so the hidden vector never
  goes through memory.

``gemv`` is a ``torch.library.triton_op`` (``torch.ops.ds_core.gemv``): torch.compile keeps it in
the graph and CUDA graphs capture it. Block sizes come from ``gemv_config`` (measured on an H100,
overridable with ``DS_CORE_GEMV_BLOCKS=BLOCK_NxBLOCK_K`` for benchmarks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gemv_kernel(
    x_ptr, up_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
    HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if EVEN_K:
            x = tl.load(x_ptr + ks)
        else:
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0)
        if HAS_UP:
            if EVEN_K:
                u = tl.load(up_ptr + ks)
            else:
                u = tl.load(up_ptr + ks, mask=k_ok, other=0.0)
            xf = x.to(tl.float32)
            silu = (xf / (1.0 + tl.exp(-xf))).to(x.dtype)  # F.silu, rounded like the unfused op
            x = (silu.to(tl.float32) * u.to(tl.float32)).to(x.dtype)
        w = tl.load(
            w_ptr + rows[:, None] * stride_w + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",  # read once: keep L2 for the activations
        )
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv_config(N: int, K: int, prologue: bool = False) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) as measured on an H100 (docs/benchmarks/ds-models.md): one row of 1024 per
    program for the narrow weights (many programs, a long contiguous read each), 4 x 512 for the
    wide ones (gate/up, lm_head); with the SiLU·up prologue 2 rows, so that fewer programs redo it."""
    forced = os.environ.get("DS_CORE_GEMV_BLOCKS", "")
    if forced:
        bn, bk = forced.lower().split("x")
        return int(bn), int(bk)
    if prologue:
        return 2, 1024
    if N >= 4 * K:
        return 4, 512
    return 1, 1024


@torch.library.triton_op("ds_core::gemv", mutates_args=())
def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """x (K,) or (1, K) and weight (N, K) with unit last stride -> (N,) or (1, N) in x's dtype.

    With ``up`` (same shape as x) the input is ``silu(x) * up``; with ``bias`` (N,) it is added.
    """
    N, K = weight.shape
    x = x.contiguous()  # one row: (K,), (1, K), (1, 1, K)
    up = None if up is None else up.contiguous()
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    bn, bk = gemv_config(N, K, up is not None)
    torch.library.wrap_triton(_gemv_kernel)[(triton.cdiv(N, bn),)](
        x, x if up is None else up, weight, weight if bias is None else bias, y, N, K, weight.stride(0),
        HAS_UP=up is not None, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0,
        num_warps=4,
    )  # fmt: skip
    return y
