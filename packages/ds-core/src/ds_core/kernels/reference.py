"""Plain-PyTorch definition of the sparse MLP: the living definition of its semantics.

Every fast path (the Triton kernels in ``triton_mlp.py``, the CPU gather path in ``cpu_mlp.py``,
the packed weights of static mode) is tested against these functions. Weights use the
``nn.Linear`` layout ``(out, in)``; ``wt`` arguments are the transposed ``(in, out)`` layout the
row-gather kernels read.

Dynamic (activation) sparsity: an activation entering a projection takes part only if its
magnitude is strictly above the projection's threshold; the others count as zero, so the weight
rows that multiply them need not be read. Thresholds are compared in float32 whatever the
activation dtype, and are either one number per projection (calibrated offline) or one number
per token (``topk_threshold``: exact per-token top-k, used before calibration).

Static (neuron) sparsity: only the intermediate neurons in ``keep`` exist; the others output 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> Tensor:
    """Dense SwiGLU: ``down(silu(gate(x)) * up(x))``; (..., d_model) -> (..., d_model)."""
    return F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)


def topk_threshold(a: Tensor, ratio: float) -> Tensor:
    """Per-row threshold that skips the ``round(ratio * n)`` smallest magnitudes: (..., n) -> (..., 1).

    Rows keep ``|a| > threshold``; with ``ratio == 0`` the threshold is -inf (keep everything).
    """
    n = a.shape[-1]
    n_skip = round(ratio * n)
    if n_skip == 0:
        return torch.full((*a.shape[:-1], 1), float("-inf"), device=a.device, dtype=torch.float32)
    return a.abs().float().kthvalue(n_skip, dim=-1, keepdim=True).values


def sparsify(a: Tensor, threshold: Tensor | float) -> Tensor:
    """Zero the entries of ``a`` whose magnitude is not strictly above ``threshold`` (compared in float32).

    ``threshold`` is a number, a 0-d tensor, or a tensor broadcasting against ``a`` (e.g. (..., 1)
    for one threshold per token).
    """
    keep = a.abs().float() > torch.as_tensor(threshold, device=a.device).float()
    return torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))


def sparse_gemv(x: Tensor, wt: Tensor, threshold: Tensor | float) -> Tensor:
    """Row-gather GEMV/GEMM: ``sparsify(x, threshold) @ wt``; x (B, K), wt (K, N) -> (B, N) float32.

    Row ``k`` of ``wt`` is read only for tokens with ``|x[:, k]| > threshold``.
    """
    return sparsify(x, threshold).float() @ wt.float()


def dynamic_sparse_swiglu(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    t_in: Tensor | float,
    t_hidden: Tensor | float,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> Tensor:
    """SwiGLU with activation sparsity on the input of every projection.

    ``x`` (..., d_model) is sparsified with ``t_in`` before gate and up (one mask for both: they
    read the same input), ``h = silu(g) * u`` (..., d_ff) with ``t_hidden`` before down.
    Thresholds of shape (..., 1) are per token.
    """
    xs = sparsify(x, t_in)
    h = F.silu(F.linear(xs, w_gate, b_gate)) * F.linear(xs, w_up, b_up)
    return F.linear(sparsify(h, t_hidden), w_down, b_down)


def static_keep_count(d_ff: int, ratio: float) -> int:
    """How many neurons static mode keeps: ``d_ff - round(ratio * d_ff)``, at least one.

    From ``d_ff >= 1024`` on the count is rounded up to a multiple of 64, so the packed weights
    keep 16-byte-aligned rows and whole GEMM tiles (7706 kept rows ran at 80% of the dense
    bandwidth on an H100; ratio 0.3 of 11008 keeps 7744 instead).
    """
    n_keep = max(1, d_ff - round(ratio * d_ff))
    if d_ff >= 1024:
        n_keep = min(d_ff, -(-n_keep // 64) * 64)
    return n_keep


def static_keep(score: Tensor, ratio: float) -> Tensor:
    """Indices (ascending) of the ``static_keep_count`` highest-scoring neurons."""
    n_keep = static_keep_count(score.shape[0], ratio)
    return torch.topk(score.float(), n_keep, sorted=False).indices.sort().values


def static_sparse_swiglu(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    keep: Tensor,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> Tensor:
    """SwiGLU where only the intermediate neurons ``keep`` exist (the others output 0)."""
    mask = torch.zeros(w_gate.shape[0], dtype=x.dtype, device=x.device)
    mask[keep] = 1
    h = F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up) * mask
    return F.linear(h, w_down, b_down)
