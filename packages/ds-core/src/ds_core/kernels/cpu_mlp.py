"""CPU fast path of the dynamic sparse MLP: read only the weight rows each token needs.

With the weights laid out (in, out), an active input ``k`` of a token needs row ``k``; the
token's output is the weighted sum of its active rows, which is exactly ``F.embedding_bag`` with
``per_sample_weights`` (one bag per token). That reads ``(1 - ratio)`` of the weight bytes per
token instead of all of them, with no gathered copy of the weights. It pays while few tokens
share the layer (batch-1 decoding); ``SparseMLP`` switches to dense GEMMs beyond that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ds_core.kernels.reference import topk_threshold


def gather_matmul(a: Tensor, wt: Tensor, threshold: Tensor) -> Tensor:
    """``sparsify(a, threshold) @ wt`` reading only active rows: a (B, K), wt (K, N) -> (B, N)."""
    keep = a.abs().float() > threshold.float()  # (B, K)
    counts = keep.sum(dim=1)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    rows = keep.nonzero()[:, 1]  # token-major, so each token's rows form one bag
    return F.embedding_bag(rows, wt, offsets, mode="sum", per_sample_weights=a[keep])


def dynamic_swiglu_gather(
    x: Tensor,
    wgu_t: Tensor,
    wd_t: Tensor,
    t_in: Tensor,
    t_hidden: Tensor | None,
    ratio: float,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> Tensor:
    """Dynamic sparse SwiGLU; x (B, d_model), wgu_t (d_model, 2 d_ff), wd_t (d_ff, d_model).

    ``t_hidden=None`` means per-token top-k on the hidden activations (uncalibrated module).
    """
    g, u = gather_matmul(x, wgu_t, t_in).chunk(2, dim=-1)  # (B, d_ff) each
    if b_gate is not None:
        g, u = g + b_gate, u + b_up
    h = F.silu(g) * u
    if t_hidden is None:
        t_hidden = topk_threshold(h, ratio)
    y = gather_matmul(h, wd_t, t_hidden)  # (B, d_model)
    return y if b_down is None else y + b_down
