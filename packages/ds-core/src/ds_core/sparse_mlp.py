"""SparseMLP: a SwiGLU MLP whose ``sparse_ratio`` skips work, in one of two modes.

``static``  a learned score per intermediate neuron; the top ``1 - ratio`` neurons are kept for
            every token. Training multiplies the hidden activations by the hard top-k mask with a
            straight-through estimator (forward uses the hard mask, gradients reach the score
            through ``sigmoid(score)``). Inference packs the kept rows/columns into smaller dense
            weights (cached), so every batch size runs a smaller cuBLAS/CPU GEMM.
``dynamic`` per-token activation sparsity (TEAL-style): activations entering a projection whose
            magnitude is at or under a calibrated threshold are skipped, so the matching rows of
            the transposed weights are never read. Gate and up share the input mask, down has its
            own. Thresholds come from ``calibration(model)`` / ``SparseMLP.calibrate``; before
            calibration every token keeps its exact top ``1 - ratio`` magnitudes (slower).
            When a batch is so large that the union of its active rows approaches all rows, the
            layer runs dense GEMMs on the masked activations instead (same result).

Semantics are defined in ``kernels/reference.py``; this file only chooses how to compute them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_core import backends
from ds_core.config import DsCoreError, SparsityConfig
from ds_core.kernels import reference

# Dynamic mode on the CPU gathers each token's active rows (``embedding_bag``); that only pays
# while the rows read, summed over tokens, stay under this share of one dense pass over the
# weights (2-core CPU, one 4096 x 22016 projection: 0.8x of dense reading 0.7 of the rows, 1.0x
# at 0.5, 1.46x at 0.4, 2.16x at 0.3).
CPU_GATHER_MAX_ROWS_READ = 0.45
# Largest token count the Triton row-gather kernels take; larger batches always go dense.
TRITON_MAX_TOKENS = 16
_CALIB_SAMPLES_PER_CALL = 1 << 16
_CALIB_MAX_SAMPLES = 1 << 22


class ThresholdCalibrated:
    """What ``calibration`` needs of a module: the protocol SparseMLP and DynamicSparseLinear share.

    A calibrated module holds an ``act_threshold`` buffer with one threshold per activation
    stream it sparsifies (NaN until calibrated) and a ``_cache`` dict of host-side values and
    packed / transposed weight copies (cleared on ``train()``: they go stale once weights train). While ``_calib`` is set
    (inside ``calibration``) its forward pass runs dense and hands the streams, in the buffer's
    order, to ``self._calib.add(...)``; on leaving the block each threshold becomes the
    ``sparse_ratio``-quantile of its stream's recorded magnitudes.
    """

    sparsity: SparsityConfig
    _calib: _Samples | None = None

    def _wants_calibration(self) -> bool:
        return self.sparsity.mode == "dynamic" and self.sparsity.sparse_ratio > 0

    @property
    def calibrated(self) -> bool:
        return hasattr(self, "act_threshold") and not math.isnan(self._host_thresholds()[0])

    def train(self, mode: bool = True):
        self._cache.clear()  # packed / transposed copies go stale once weights train
        return super().train(mode)  # type: ignore[misc]

    def clear_cache(self) -> None:
        """Free the packed (static) / transposed (dynamic) weight copies kept for inference."""
        self._cache.clear()

    @torch.no_grad()
    def calibrate(self, inputs: Tensor | Iterable[Tensor]):
        """Set the dynamic-mode thresholds from the activations of ``inputs`` (one tensor or an iterable)."""
        with calibration(self):
            for x in [inputs] if isinstance(inputs, Tensor) else inputs:
                self(x)
        return self

    @torch.no_grad()
    def _set_thresholds(self, samples: _Samples) -> None:
        ratio = self.sparsity.sparse_ratio
        values = [reference.topk_threshold(s.reshape(1, -1), ratio).reshape(()) for s in samples.finish()]
        self.act_threshold.copy_(torch.stack(values).to(self.act_threshold))
        self._cache.clear()

    def _host_thresholds(self) -> tuple[float, ...]:
        """The thresholds as Python floats, read from the device once per change of the buffer
        (a decode loop or a captured CUDA graph never syncs on them)."""
        buf = self.act_threshold
        key = _version_key(buf)
        cached = self._cache.get("thresholds")
        if cached is None or cached[0] != key:
            cached = (key, tuple(float(v) for v in buf.detach().float().cpu()))
            self._cache["thresholds"] = cached
        return cached[1]


class SparseMLP(ThresholdCalibrated, nn.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))`` with static or dynamic sparsity.

    ``gate_proj``, ``up_proj`` and ``down_proj`` are plain ``nn.Linear`` (HF Llama layout), so
    state dicts match HF checkpoints; the extra sparse state (``neuron_score`` in static mode,
    ``act_threshold`` in dynamic mode) is filled in when a checkpoint lacks it and dropped when a
    checkpoint carries state of the other mode (see ``sparse_state_keys``).
    """

    def __init__(self, d_model: int, d_ff: int, sparsity: SparsityConfig | None = None, bias: bool = False):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DsCoreError(f"SparseMLP: {name}: expected a positive integer, got {value!r}")
        if sparsity is not None and not isinstance(sparsity, SparsityConfig):
            raise DsCoreError(
                f"SparseMLP: sparsity: expected a SparsityConfig, got {type(sparsity).__name__}"
            )
        self.d_model, self.d_ff = d_model, d_ff
        self.sparsity = sparsity if sparsity is not None else SparsityConfig()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        ratio, mode = self.sparsity.sparse_ratio, self.sparsity.mode
        if ratio > 0 and mode == "static":
            # A parameter only when it gets gradients (DDP rejects parameters that never do).
            self.neuron_score = nn.Parameter(self._score_from_weights(*self._weights()))
        if ratio > 0 and mode == "dynamic":
            # [input threshold (gate/up), hidden threshold (down)]; NaN = not calibrated yet.
            self.register_buffer("act_threshold", torch.full((2,), float("nan")))
        self._cache: dict[str, tuple[tuple, Any]] = {}
        self._calib: _Samples | None = None

    # ----------------------------------------------------------------------------- public API
    def sparse_state_keys(self) -> list[str]:
        """State-dict keys (relative to this module) that hold sparse state rather than weights."""
        return [k for k in ("neuron_score", "act_threshold") if hasattr(self, k)]

    def extra_repr(self) -> str:
        s = self.sparsity
        return f"d_model={self.d_model}, d_ff={self.d_ff}, sparse_ratio={s.sparse_ratio}, mode={s.mode}"

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        self._check_input(x)
        ratio = self.sparsity.sparse_ratio
        if ratio == 0.0:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self._calib is not None:
            return self._calibration_forward(x)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        # The fast paths read the weights directly; projections that are swapped (quantized) or
        # observed through hooks (GPTQ's Hessians, activation statistics) must run as modules.
        plain = all(
            type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in projections
        )
        if self.sparsity.mode == "static":
            if needs_grad or not plain:
                return self._static_masked(x)
            return self._static_packed(x)
        if needs_grad or not plain:
            t_in, t_hidden = self._thresholds_for(x)
            xs = reference.sparsify(x, t_in)
            h = F.silu(self.gate_proj(xs)) * self.up_proj(xs)
            return self.down_proj(reference.sparsify(h, self._hidden_threshold(h, t_hidden)))
        return self._dynamic_inference(x, backend)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise DsCoreError(f"SparseMLP: x: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.d_model:
            raise DsCoreError(f"SparseMLP: x: expected shape (..., {self.d_model}), got {tuple(x.shape)}")
        w = self.gate_proj.weight
        if not x.is_floating_point():
            raise DsCoreError(f"SparseMLP: x: expected a floating-point tensor, got {x.dtype}")
        if x.device != w.device:
            raise DsCoreError(f"SparseMLP: x: on {x.device} but the weights are on {w.device}")
        if w.is_floating_point() and x.dtype != w.dtype:
            raise DsCoreError(f"SparseMLP: x: dtype {x.dtype} differs from the weights' {w.dtype}")

    # --------------------------------------------------------------------------- static mode
    def static_keep_indices(self) -> Tensor:
        """Ascending indices of the neurons static mode keeps (exporters gather these, e.g. ds-quant)."""
        return reference.static_keep(self.neuron_score.detach(), self.sparsity.sparse_ratio)

    def _static_masked(self, x: Tensor) -> Tensor:
        keep = reference.static_keep(self.neuron_score, self.sparsity.sparse_ratio)
        soft = torch.sigmoid(self.neuron_score.float())
        hard = torch.zeros_like(soft).index_fill_(0, keep, 1.0)
        mask = (hard + (soft - soft.detach())).to(x.dtype)  # value: hard mask; gradient: d sigmoid
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x) * mask)

    def _static_packed(self, x: Tensor) -> Tensor:
        wg, wu, wd = self._weights()
        bg, bu, bd = self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias
        key = _version_key(self.neuron_score, wg, wu, wd, bg, bu, bd)
        cached = self._cache.get("static")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                keep = reference.static_keep(self.neuron_score, self.sparsity.sparse_ratio)
                w_gu = torch.cat([wg[keep], wu[keep]])  # (2k, d_model): one GEMM for gate and up
                b_gu = None if bg is None else torch.cat([bg[keep], bu[keep]])
                w_d = wd[:, keep].contiguous()  # (d_model, k)
            cached = (key, (w_gu, b_gu, w_d))
            self._cache["static"] = cached
        w_gu, b_gu, w_d = cached[1]
        g, u = F.linear(x, w_gu, b_gu).chunk(2, dim=-1)  # (..., k) each
        return F.linear(F.silu(g) * u, w_d, bd)

    @staticmethod
    def _score_from_weights(wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
        """Initial neuron score: log of the neuron's weight-norm product, centred (ranking = magnitude)."""
        with torch.no_grad():
            norms = wg.float().norm(dim=1) * wu.float().norm(dim=1) * wd.float().norm(dim=0)
            score = norms.clamp_min(1e-30).log()
            return (score - score.mean()).to(wg.dtype if wg.is_floating_point() else torch.float32)

    # -------------------------------------------------------------------------- dynamic mode
    # Never traced by torch.compile: dynamo would capture the Triton launches into its graph and
    # functionalize their in-place writes, but these kernels write through aliasing views of one
    # buffer (sums, arrival counters) and choose kernels from host-side caches. As a graph break
    # the layer runs as written (inside a captured CUDA graph it costs nothing per step). On an
    # H100 the traced version decoded different tokens from eager on a float32 model.
    @torch.compiler.disable
    def _dynamic_inference(self, x: Tensor, backend: str) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.d_model).contiguous()  # (B, d_model); no copy when already contiguous
        n_tok = x2.shape[0]
        t_in, t_hidden = self._thresholds_for(x2)
        ratio = self.sparsity.sparse_ratio
        which = backends.resolve(backend, x.device)
        bg, bu, bd = self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias
        if which == "triton" and n_tok > 0:
            from ds_core.kernels import triton_mlp

            # Union of active rows over the batch if tokens chose independently: 1 - ratio^B.
            union = 1.0 - ratio**n_tok
            if n_tok <= TRITON_MAX_TOKENS and union <= self.sparsity.dense_fallback_union:
                wgu_t, wd_t = self._transposed()
                y = triton_mlp.dynamic_swiglu(x2, wgu_t, wd_t, t_in, t_hidden, ratio, bg, bu, bd)
            else:
                y = triton_mlp.masked_dense_swiglu(x2, *self._weights(), t_in, t_hidden, ratio, bg, bu, bd)
            return y.reshape(shape)
        if x.device.type == "cpu" and 0 < n_tok * (1.0 - ratio) <= CPU_GATHER_MAX_ROWS_READ:
            from ds_core.kernels import cpu_mlp

            wgu_t, wd_t = self._transposed()
            y = cpu_mlp.dynamic_swiglu_gather(x2, wgu_t, wd_t, t_in, t_hidden, ratio, bg, bu, bd)
            return y.reshape(shape)
        xs = reference.sparsify(x2, t_in)
        h = F.silu(F.linear(xs, self.gate_proj.weight, bg)) * F.linear(xs, self.up_proj.weight, bu)
        return F.linear(
            reference.sparsify(h, self._hidden_threshold(h, t_hidden)), self.down_proj.weight, bd
        ).reshape(shape)

    def _thresholds_for(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(input threshold, hidden threshold); before calibration the input threshold is per token
        (..., 1) and the hidden one is None (computed per token from h once h exists)."""
        if math.isnan(self._host_thresholds()[0]):
            return reference.topk_threshold(x, self.sparsity.sparse_ratio), None
        return self.act_threshold[0], self.act_threshold[1]

    def _hidden_threshold(self, h: Tensor, t_hidden: Tensor | None) -> Tensor:
        return reference.topk_threshold(h, self.sparsity.sparse_ratio) if t_hidden is None else t_hidden

    def _transposed(self) -> tuple[Tensor, Tensor]:
        """Weights laid out (in, out) so the rows an active input needs are contiguous.

        Returns ``wgu_t`` (d_model, 2 * d_ff) = [W_gate^T | W_up^T] and ``wd_t`` (d_ff, d_model).
        This is a second copy of the weights, kept while the module is used for inference.
        """
        wg, wu, wd = self._weights()
        key = _version_key(wg, wu, wd)
        cached = self._cache.get("transposed")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, (torch.cat([wg, wu]).t().contiguous(), wd.t().contiguous()))
            self._cache["transposed"] = cached
        return cached[1]

    # ---------------------------------------------------------------------------- calibration
    def _calibration_forward(self, x: Tensor) -> Tensor:
        """Dense forward that records |x| and |h| samples for the thresholds (TEAL calibrates on dense)."""
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        self._calib.add(x, h)
        return self.down_proj(h)

    # ------------------------------------------------------------------------------- loading
    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # HF checkpoints carry no sparse state, and a checkpoint of one mode may meet a module of
        # another: fill in what is missing, drop what this module does not have.
        for name in ("neuron_score", "act_threshold"):
            key = prefix + name
            if not hasattr(self, name):
                state_dict.pop(key, None)
            elif key not in state_dict:
                if name == "neuron_score":
                    ws = [
                        state_dict.get(prefix + f"{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")
                    ]
                    ws = [w if w is not None else ref for w, ref in zip(ws, self._weights())]
                    state_dict[key] = self._score_from_weights(*ws).to(self.neuron_score)
                else:
                    state_dict[key] = self.act_threshold.detach().clone()
        self._cache.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class calibration(AbstractContextManager):
    """Calibrate the dynamic-mode thresholds of every SparseMLP and DynamicSparseLinear inside ``model``.

    Forward passes run inside the block are dense and record activation magnitudes; on leaving
    the block each module's thresholds are set so that ``sparse_ratio`` of the recorded
    activations entering each sparsified projection fall at or under them::

        with ds_core.calibration(model), torch.no_grad():
            for batch in calibration_batches:
                model(batch)
    """

    def __init__(self, model: nn.Module, max_samples: int = _CALIB_MAX_SAMPLES):
        self.modules = [
            m for m in model.modules() if isinstance(m, ThresholdCalibrated) and m._wants_calibration()
        ]
        if not self.modules:
            raise DsCoreError(
                "calibration: model: holds no SparseMLP or DynamicSparseLinear with mode='dynamic' "
                "and sparse_ratio > 0"
            )
        for m in self.modules:
            m._calib = _Samples(max_samples)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        samples = [(m, m._calib) for m in self.modules]
        for m in self.modules:
            m._calib = None
        if exc_type is not None:
            return
        for m, s in samples:
            if s.seen == 0:
                raise DsCoreError(
                    f"calibration: no forward pass reached a {type(m).__name__} inside the block"
                )
            m._set_thresholds(s)


class _Samples:
    """A bounded, evenly strided sample of the magnitudes of each activation stream (float32, on the CPU)."""

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self.parts: list[list[Tensor]] = []
        self.seen = 0

    @torch.no_grad()
    def add(self, *streams: Tensor) -> None:
        self.seen += 1
        if not self.parts:
            self.parts = [[] for _ in streams]
        for part, a in zip(self.parts, streams, strict=True):
            flat = a.detach().reshape(-1)
            step = max(1, flat.numel() // _CALIB_SAMPLES_PER_CALL)
            part.append(flat[::step].abs().float().cpu())

    def finish(self) -> list[Tensor]:
        out = []
        for part in self.parts:
            flat = torch.cat(part)
            step = max(1, flat.numel() // self.max_samples)
            out.append(flat[::step])
        return out


def _version_key(*tensors: Tensor | None) -> tuple:
    """Changes whenever any tensor is replaced, moved, or modified in place."""
    return tuple(
        None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors
    )
