"""DynamicSparseLinear: an ``nn.Linear`` whose ``sparse_ratio`` skips input activations.

TEAL-style activation sparsity on the input of one projection (attention q/k/v/o, or any
Linear): ``y = sparsify(x) @ W^T + b``, where an input entry takes part only if it survives the
mode's selection, so the weight columns (rows of ``W^T``) that would multiply the others are
never read.

``dynamic`` entries with ``|x| <=`` a calibrated per-layer threshold are skipped
            (``ds_core.calibration(model)`` / ``module.calibrate(inputs)``, shared with
            SparseMLP). Before calibration each token keeps its exact top ``1 - ratio``
            magnitudes (slower: a per-token k-th value).
``static``  a learned score per input feature; the top ``1 - ratio`` features are kept for
            every token. Training multiplies x by the hard mask with a straight-through
            estimator (gradients reach the score through ``sigmoid(score)``); inference runs
            ``F.linear(x[..., keep], W[:, keep], b)`` on a cached packed weight, so every batch
            size gains.

The module IS an ``nn.Linear`` (same ``weight`` (out, in), ``bias``, state-dict keys), so HF
checkpoints load, ``isinstance(m, nn.Linear)`` code (ds-quant's plan, peft's LoRA) treats it
as a Linear, and ``type(m) is nn.Linear`` code (fused q/k/v buffers, tensor parallelism) leaves
it alone. ``sparse_ratio == 0`` is exactly ``nn.Linear``. Semantics: ``kernels/reference.py``.

Callers that fuse several projections sharing one input (q/k/v) use the functional
``sparse_linear(x, weight_t, threshold, bias)`` on the concatenated transposed weights
(``torch.cat([m.transposed_weight() for m in (q, k, v)], dim=1)``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_core import backends
from ds_core.config import DsCoreError, SparsityConfig
from ds_core.kernels import reference
from ds_core.sparse_mlp import (
    CPU_GATHER_MAX_ROWS_READ,
    TRITON_MAX_TOKENS,
    ThresholdCalibrated,
    _version_key,
)

# Triton row-gather path: finish the output (bias, cast) inside the GEMV instead of with torch
# ops after it. H100, bf16, batch 1, no bias (bench_sparse_linear.py): 37.4 / 29.2 us fused vs
# 36.8 / 29.1 us unfused for 4096 x 12288 at ratio 0.3 / 0.5, 19.9 / 17.3 vs 20.2 / 18.0 us for
# 4096 x 4096: a wash, so the simpler unfused path stays.
FUSED_CAST = False
# Batches of 2..16 tokens take the row-gather kernel only while the predicted union of their
# active rows is at most this (and at most SparsityConfig.dense_fallback_union). One projection
# is too short to hide the batched kernel's overhead as the MLP does: H100, 4 tokens at ratio
# 0.5 (union 0.94) ran 0.93x / 0.88x of dense on 4096 x 12288 / 4096 x 4096, while batch 1 at
# union 0.7 still ran 1.33x / 1.16x.
LINEAR_BATCHED_MAX_UNION = 0.75


def sparse_linear(
    x: Tensor,
    weight_t: Tensor,
    threshold: Tensor | float,
    bias: Tensor | None = None,
    *,
    ratio: float = 0.5,
    dense_fallback_union: float = 0.95,
    backend: str = "auto",
) -> Tensor:
    """``sparsify(x, threshold) @ weight_t + bias`` reading only the rows of ``weight_t`` it needs.

    ``x`` (..., in); ``weight_t`` (in, out) contiguous: the TRANSPOSED ``nn.Linear`` weight, so
    the row an active input needs is contiguous (``DynamicSparseLinear.transposed_weight()``, or
    several of them concatenated along dim 1 to fuse projections sharing ``x``); ``bias`` (out,).
    ``threshold``: a number, a 0-d / (1,) tensor, or one per token (..., 1); an entry takes part
    iff ``|x| > threshold`` (compared in float32). ``ratio`` is the expected skipped share, used
    only to choose the kernel: the row-gather kernel while the predicted union of the rows a
    batch needs (``1 - ratio**tokens``) is at most ``dense_fallback_union`` (for 2..16 tokens
    also at most ``LINEAR_BATCHED_MAX_UNION``), else a masked dense GEMM (same result). Returns (..., out) in x's dtype. No autograd through the fast paths:
    with gradients enabled it runs the reference (differentiable) computation.
    """
    _check_x(x, None, "sparse_linear")
    _check_weight_t(weight_t, x)
    _check_x(x, weight_t.shape[0], "sparse_linear")
    if bias is not None:
        _check_bias(bias, weight_t.shape[1], x, "sparse_linear")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise DsCoreError(f"sparse_linear: ratio: expected a number in [0, 1), got {ratio!r}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (B, in)
    t = threshold
    if isinstance(t, Tensor):
        if t.numel() != 1 and t.numel() != x2.shape[0]:
            raise DsCoreError(
                f"sparse_linear: threshold: expected one value or one per token ({x2.shape[0]}), "
                f"got shape {tuple(t.shape)}"
            )
        t = t.reshape(-1, 1) if t.numel() != 1 else t.reshape(1)
    elif isinstance(t, bool) or not isinstance(t, (int, float)):
        raise DsCoreError(f"sparse_linear: threshold: expected a number or a tensor, got {type(t).__name__}")
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (x, weight_t, bias)):
        y = F.linear(reference.sparsify(x2, t), weight_t.t(), bias)
    else:
        y = _dispatch(x2.contiguous(), weight_t, t, bias, float(ratio), dense_fallback_union, backend, None)
    return y.reshape(*shape[:-1], weight_t.shape[1])


class DynamicSparseLinear(ThresholdCalibrated, nn.Linear):
    """``nn.Linear`` with static or dynamic activation sparsity on its input.

    ``DynamicSparseLinear(in_features, out_features, bias=True, device=None, dtype=None,
    sparsity=SparsityConfig(sparse_ratio=0.5))``; ``forward(x: (..., in), backend="auto")``.
    Extra state (``act_threshold`` (1,) in dynamic mode, NaN until calibrated; ``feature_score``
    (in,) in static mode) is filled in when a checkpoint lacks it (plain ``nn.Linear`` / HF state
    dicts) and dropped when a checkpoint carries state of the other mode.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        sparsity: SparsityConfig | None = None,
    ):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DsCoreError(f"DynamicSparseLinear: {name}: expected a positive integer, got {value!r}")
        if sparsity is not None and not isinstance(sparsity, SparsityConfig):
            raise DsCoreError(
                f"DynamicSparseLinear: sparsity: expected a SparsityConfig, got {type(sparsity).__name__}"
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.sparsity = sparsity if sparsity is not None else SparsityConfig()
        self._cache: dict[str, tuple[tuple, Any]] = {}
        self._calib = None
        ratio, mode = self.sparsity.sparse_ratio, self.sparsity.mode
        if ratio > 0 and mode == "static":
            # A parameter only when it gets gradients (DDP rejects parameters that never do).
            self.feature_score = nn.Parameter(self._score_from_weight(self.weight))
        if ratio > 0 and mode == "dynamic":
            self.register_buffer("act_threshold", torch.full((1,), float("nan"), device=self.weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparsity: SparsityConfig | None = None) -> DynamicSparseLinear:
        """A DynamicSparseLinear sharing ``linear``'s weight and bias Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise DsCoreError(
                f"DynamicSparseLinear.from_linear: linear: expected an nn.Linear, got {type(linear).__name__}"
            )
        w = linear.weight
        with torch.device("meta"):
            m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, sparsity=sparsity)
        m.weight, m.bias = w, linear.bias
        if hasattr(m, "feature_score"):
            m.feature_score = nn.Parameter(m._score_from_weight(w))
        if hasattr(m, "act_threshold"):
            m.act_threshold = torch.full((1,), float("nan"), device=w.device, dtype=w.dtype)
        return m

    # ----------------------------------------------------------------------------- public API
    def sparse_state_keys(self) -> list[str]:
        """State-dict keys (relative to this module) that hold sparse state rather than weights."""
        return [k for k in ("feature_score", "act_threshold") if hasattr(self, k)]

    def transposed_weight(self) -> Tensor:
        """The weight laid out (in, out), contiguous, for ``sparse_linear``: cached until the weight
        changes (a second copy of the weight, kept while the module is used for inference)."""
        w = self.weight
        key = _version_key(w)
        cached = self._cache.get("transposed")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, w.t().contiguous())
            self._cache["transposed"] = cached
        return cached[1]

    def static_keep_indices(self) -> Tensor:
        """Ascending indices of the input features static mode keeps."""
        return reference.static_keep(self.feature_score.detach(), self.sparsity.sparse_ratio)

    def extra_repr(self) -> str:
        s = self.sparsity
        return f"{super().extra_repr()}, sparse_ratio={s.sparse_ratio}, mode={s.mode}"

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        if backend not in backends.BACKENDS:
            raise DsCoreError(
                f"DynamicSparseLinear: backend: expected one of {', '.join(backends.BACKENDS)}, got {backend!r}"
            )
        ratio = self.sparsity.sparse_ratio
        if ratio == 0.0:
            return F.linear(x, self.weight, self.bias)  # exactly nn.Linear
        _check_x(x, self.in_features, "DynamicSparseLinear", self.weight)
        if self._calib is not None:  # dense forward recording |x| (TEAL calibrates on dense)
            self._calib.add(x)
            return F.linear(x, self.weight, self.bias)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if self.sparsity.mode == "static":
            return self._static_masked(x) if needs_grad else self._static_packed(x)
        if needs_grad:
            return F.linear(reference.sparsify(x, self._threshold_for(x)), self.weight, self.bias)
        return self._dynamic_inference(x, backend)

    # Never traced by torch.compile (as SparseMLP's dynamic path): the Triton launches write
    # through aliasing views and pick kernels from host-side caches; as a graph break the layer
    # runs as written, and inside a captured CUDA graph it costs nothing per step.
    @torch.compiler.disable
    def _dynamic_inference(self, x: Tensor, backend: str) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()  # (B, in)
        t = self._threshold_for(x2)
        y = _dispatch(
            x2, None, t, self.bias, self.sparsity.sparse_ratio, self.sparsity.dense_fallback_union,
            backend, self,
        )  # fmt: skip
        return y.reshape(*shape[:-1], self.out_features)

    def _threshold_for(self, x: Tensor) -> Tensor:
        """The calibrated threshold (1,), or before calibration one per token (..., 1)."""
        if not self.calibrated:
            return reference.topk_threshold(x, self.sparsity.sparse_ratio)
        return self.act_threshold

    # --------------------------------------------------------------------------- static mode
    def _static_masked(self, x: Tensor) -> Tensor:
        keep = reference.static_keep(self.feature_score, self.sparsity.sparse_ratio)
        soft = torch.sigmoid(self.feature_score.float())
        hard = torch.zeros_like(soft).index_fill_(0, keep, 1.0)
        mask = (hard + (soft - soft.detach())).to(x.dtype)  # value: hard mask; gradient: d sigmoid
        return F.linear(x * mask, self.weight, self.bias)

    def _static_packed(self, x: Tensor) -> Tensor:
        key = _version_key(self.feature_score, self.weight)
        cached = self._cache.get("static")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                keep = reference.static_keep(self.feature_score, self.sparsity.sparse_ratio)
                cached = (key, (keep, self.weight[:, keep].contiguous()))  # (out, k)
            self._cache["static"] = cached
        keep, w = cached[1]
        return F.linear(x.index_select(-1, keep), w, self.bias)  # (..., k) @ (k, out)

    @staticmethod
    def _score_from_weight(w: Tensor) -> Tensor:
        """Initial feature score: log of the weight column's norm, centred (ranking = magnitude)."""
        with torch.no_grad():
            score = w.float().norm(dim=0).clamp_min(1e-30).log()
            return (score - score.mean()).to(w.dtype if w.is_floating_point() else torch.float32)

    # ------------------------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # nn.Linear / HF checkpoints carry no sparse state, and a checkpoint of one mode may meet
        # a module of another: fill in what is missing, drop what this module does not have.
        for name in ("feature_score", "act_threshold"):
            key = prefix + name
            if not hasattr(self, name):
                state_dict.pop(key, None)
            elif key not in state_dict:
                if name == "feature_score":
                    w = state_dict.get(prefix + "weight", self.weight)
                    state_dict[key] = self._score_from_weight(w).to(self.feature_score)
                else:
                    state_dict[key] = self.act_threshold.detach().clone()
        self._cache.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


# ------------------------------------------------------------------------------------ dispatch
@torch.compiler.disable  # callers of the functional inside torch.compile get a graph break here
def _dispatch(
    x2: Tensor,
    weight_t: Tensor | None,
    t: Tensor | float,
    bias: Tensor | None,
    ratio: float,
    union_limit: float,
    backend: str,
    module: DynamicSparseLinear | None,
) -> Tensor:
    """x2 (B, in) contiguous -> (B, out) in x2's dtype, no autograd. The module (if given) supplies
    its cached transposed weight lazily and its (out, in) weight for the dense fallback."""
    n_tok = x2.shape[0]

    def wt() -> Tensor:
        return module.transposed_weight() if module is not None else weight_t

    def dense_weight() -> Tensor:  # (out, in): F.linear on a transposed view is the same GEMM
        return module.weight if module is not None else weight_t.t()

    which = backends.resolve(backend, x2.device)
    if which == "triton" and n_tok > 0:
        from ds_core.kernels import triton_mlp

        # Union of the rows a batch needs if tokens chose independently: 1 - ratio^B.
        if n_tok > 1:
            union_limit = min(union_limit, LINEAR_BATCHED_MAX_UNION)
        if n_tok <= TRITON_MAX_TOKENS and 1.0 - ratio**n_tok <= union_limit:
            return _gather_linear(x2, wt(), t, bias, ratio)
        return F.linear(triton_mlp.sparsify(x2, t), dense_weight(), bias)
    if x2.device.type == "cpu" and 0 < n_tok * (1.0 - ratio) <= CPU_GATHER_MAX_ROWS_READ:
        from ds_core.kernels import cpu_mlp

        y = cpu_mlp.gather_matmul(x2, wt(), torch.as_tensor(t, device=x2.device))
        return y if bias is None else y + bias
    return F.linear(reference.sparsify(x2, t), dense_weight(), bias)


def _gather_linear(
    x2: Tensor,
    wt: Tensor,
    t: Tensor | float,
    bias: Tensor | None,
    ratio: float,
    fused_cast: bool | None = None,
    config: Any = None,
) -> Tensor:
    """The Triton row-gather path: x2 (B <= 16, in), wt (in, out) -> (B, out) in x2's dtype.

    Unfused: ``triton_mlp.sparse_gemv`` (compact the active rows + split-K gather GEMV, float32
    sums), then bias and the cast as torch ops. ``fused_cast``: the GEMV's last-arriving program
    per output block adds the bias and writes x's dtype itself (two launches instead of three
    or four).
    """
    from ds_core.kernels import triton_mlp as T

    n_tok, n = x2.shape[0], wt.shape[1]
    # The gate/up GEMV's configs: its reduction (d_model = 4096 rows on ds-7b) is this layer's too.
    cfg = config or T._pick_layer(n_tok, ratio)[0]
    if not (FUSED_CAST if fused_cast is None else fused_cast):
        y = T.sparse_gemv(x2, wt, t, cfg)  # (B, out) float32
        if bias is not None:
            y += bias
        return y.to(x2.dtype)
    tv, stride_t = T._threshold_vector(t, n_tok, x2, "threshold")
    n_blk = -(-n // cfg.block_n)
    acc = torch.empty(n_tok * n + n_blk, device=x2.device, dtype=torch.float32)  # sums | arrival counters
    idx, cnt = T._compact(x2, tv, stride_t, cfg.k_split, acc)  # also zeroes acc
    out = torch.empty(n_tok, n, device=x2.device, dtype=x2.dtype)
    T._gemv(
        x2, tv, stride_t, idx, cnt, wt, n, acc[: n_tok * n].view(n_tok, n), None, cfg, epilogue=2,
        counters=acc[n_tok * n :].view(torch.int32), e_out=out, e_b1=bias,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- checking
def _check_x(x: Tensor, n_in: int | None, where: str, weight: Tensor | None = None) -> None:
    if not isinstance(x, Tensor):
        raise DsCoreError(f"{where}: x: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or (n_in is not None and x.shape[-1] != n_in):
        raise DsCoreError(f"{where}: x: expected shape (..., {n_in}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DsCoreError(f"{where}: x: expected a floating-point tensor, got {x.dtype}")
    if weight is not None:
        if x.device != weight.device:
            raise DsCoreError(f"{where}: x: on {x.device} but the weight is on {weight.device}")
        if weight.is_floating_point() and x.dtype != weight.dtype:
            raise DsCoreError(f"{where}: x: dtype {x.dtype} differs from the weight's {weight.dtype}")


def _check_weight_t(weight_t: Tensor, x: Tensor) -> None:
    if not isinstance(weight_t, Tensor) or weight_t.ndim != 2:
        got = tuple(weight_t.shape) if isinstance(weight_t, Tensor) else type(weight_t).__name__
        raise DsCoreError(f"sparse_linear: weight_t: expected a 2-D tensor (in, out), got {got}")
    if weight_t.device != x.device:
        raise DsCoreError(f"sparse_linear: weight_t: on {weight_t.device}, expected {x.device} like x")
    if weight_t.dtype != x.dtype:
        raise DsCoreError(f"sparse_linear: weight_t: dtype {weight_t.dtype}, expected {x.dtype} like x")
    if not weight_t.is_contiguous():
        raise DsCoreError(
            "sparse_linear: weight_t: expected a contiguous (in, out) tensor (e.g. weight.t().contiguous())"
        )


def _check_bias(bias: Tensor, n_out: int, x: Tensor, where: str) -> None:
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (n_out,):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise DsCoreError(f"{where}: bias: expected shape ({n_out},), got {got}")
    if bias.device != x.device or bias.dtype != x.dtype:
        raise DsCoreError(
            f"{where}: bias: {bias.dtype} on {bias.device}, expected {x.dtype} on {x.device} like x"
        )
