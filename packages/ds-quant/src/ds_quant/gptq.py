"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

The transformer is processed block by block: the calibration activations entering block i are
captured once, each linear of the block gets H = 2/n * sum(x x^T) from them, the linears are
quantized, and the block is run again with its quantized weights to produce the inputs of block
i + 1 — so later blocks correct for the error of earlier ones (with ``true_sequential``, the same
holds inside a block: q/k/v, o, gate/up and down are quantized in that order, each stage's
Hessians taken with the earlier stages already quantized). Group-wise parameters (scale, zero
point per `block_size` columns) are computed when GPTQ reaches the first column of a group, from
the already error-corrected weights; with ``act_order`` the columns are visited by decreasing
Hessian diagonal and the group parameters are fixed up front ("static groups"). Either way the
groups stay contiguous in K and the result is plain MatMulNBits data (no act-order index, which
MatMulNBits no longer supports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ds_quant.errors import DsQuantError
from ds_quant.packing import (
    PackedWeight,
    check_format,
    dequantize_codes,
    dequantize_weight,
    group_params,
    n_blocks_for,
    pack_weight,
    quantize_codes,
)


@dataclass
class GPTQConfig:
    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps H invertible
    lazy_batch: int = 128  # columns per lazy error update (a multiple of the group size is used)
    n_samples: int = 64  # calibration windows
    seq_len: int = 256  # tokens per window
    batch_size: int = 8  # windows per forward pass
    seed: int = 0  # which windows are drawn
    lm_head: bool = True  # GPTQ the lm_head too (a tied embedding then reads the same codes)
    # Defaults measured on the trained ds-small (docs/benchmarks/ds-quant.md): int4 perplexity
    # +3.2% without these two, +1.3% with both; true_sequential did not help there.
    act_order: bool = True  # columns in order of decreasing H diagonal (groups stay static)
    clip_search: bool = True  # each group's scale shrunk to the grid value of least error
    true_sequential: bool = False  # q/k/v, then o, then gate/up, then down see quantized inputs

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise DsQuantError(f"gptq.damp: expected a number in (0, 1), got {self.damp!r}")
        for name in ("lazy_batch", "n_samples", "seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DsQuantError(f"gptq.{name}: expected a positive integer, got {v!r}")
        for name in ("lm_head", "act_order", "clip_search", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise DsQuantError(f"gptq.{name}: expected true or false, got {getattr(self, name)!r}")


class Hessian:
    """Running H = 2/n * sum over tokens of x x^T for one linear's inputs (float32)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.h = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, K)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.t() @ x


@torch.no_grad()
def gptq_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    bits: int,
    block_size: int,
    sym: bool,
    damp: float = 0.01,
    lazy: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
) -> PackedWeight:
    """GPTQ one (N, K) weight given its input Hessian (K, K); returns it in MatMulNBits layout.

    act_order: visit columns by decreasing H diagonal (the inputs with the most energy first, while
    the most columns are left to absorb their error). Each group's scale and zero point are then
    fixed up front from the original weights ("static groups"), so groups stay contiguous in K and
    the result is plain MatMulNBits data (which has no act-order index). clip_search: see
    packing.group_params.
    """
    check_format(bits, block_size)
    n, k = w.shape
    n_blocks = n_blocks_for(k, block_size)
    kp = n_blocks * block_size
    w = nn.functional.pad(w.detach().float().clone(), (0, kp - k))  # (N, Kp)
    h = nn.functional.pad(h.float().clone(), (0, kp - k, 0, kp - k))  # (Kp, Kp)
    dead = torch.diag(h) == 0  # inputs that were always 0 (and the padding): any value is exact
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    scales = torch.zeros(n, n_blocks, device=w.device)
    zeros = torch.zeros(n, n_blocks, device=w.device)
    order = torch.arange(kp, device=w.device)
    if act_order:
        scales, zeros = group_params(w.view(n, n_blocks, block_size), bits, sym, clip_search=clip_search)
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    group_of = (order // block_size).tolist()  # group of the column visited at each step

    h += damp * torch.mean(torch.diag(h)) * torch.eye(kp, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as e:  # pragma: no cover - needs a pathological Hessian
        raise DsQuantError(
            f"gptq.damp: Hessian not positive definite at damp={damp}; raise it ({e})"
        ) from None

    codes = torch.zeros(n, kp, device=w.device)
    lazy = max(lazy // block_size, 1) * block_size  # group starts fall inside one lazy batch
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        w1 = w[:, i1:i2].clone()  # (N, L) updated in place as columns are quantized
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not act_order and col % block_size == 0:
                # In K order a group's parameters come from its already error-corrected weights.
                scales[:, g], zeros[:, g] = group_params(w1[:, i : i + block_size], bits, sym,
                                                         clip_search=clip_search)  # fmt: skip
            q = quantize_codes(w1[:, i], scales[:, g], zeros[:, g], bits)
            codes[:, col] = q
            e = (w1[:, i] - dequantize_codes(q, scales[:, g], zeros[:, g])) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(order)]  # back to K order
    return pack_weight(codes.view(n, n_blocks, block_size), scales, zeros, bits=bits, sym=sym, in_features=k)


class _Stop(Exception):
    """Raised by the hook that captures the first block's inputs: the rest of the model is not needed."""


@torch.no_grad()
def gptq_layers(
    model: nn.Module,
    plan: dict[str, int],
    tokens: torch.Tensor,
    *,
    block_size: int,
    sym: bool,
    config: GPTQConfig,
    progress: Callable[[str], None] | None = None,
) -> dict[str, PackedWeight]:
    """GPTQ every nn.Linear under ``model.layers`` that ``plan`` assigns a bit width, then the lm_head.

    tokens: (n_samples, seq_len) calibration ids. The model's float weights of those linears are
    overwritten with their dequantized values (the next block must see quantized outputs); the
    caller swaps the modules afterwards. Returns {module name: PackedWeight}.
    """
    layers = model.layers
    inputs: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in tokens.split(config.batch_size):
            with contextlib.suppress(_Stop):
                model(batch)
    finally:
        handle.remove()

    out: dict[str, PackedWeight] = {}
    opts = dict(block_size=block_size, sym=sym, damp=config.damp, lazy=config.lazy_batch,
                act_order=config.act_order, clip_search=config.clip_search)  # fmt: skip
    for i, layer in enumerate(layers):
        targets = {
            name: mod
            for name, mod in layer.named_modules()
            if isinstance(mod, nn.Linear) and plan.get(f"layers.{i}.{name}") is not None
        }
        for stage in _stages(targets) if config.true_sequential else [list(targets)]:
            hessians = {
                name: Hessian(targets[name].in_features, targets[name].weight.device) for name in stage
            }
            hooks = [
                targets[name].register_forward_hook(lambda m, args, y, hs=hessians[name]: hs.add(args[0]))
                for name in stage
            ]
            try:
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
            finally:
                for hk in hooks:
                    hk.remove()
            for name in stage:
                full, mod = f"layers.{i}.{name}", targets[name]
                packed = gptq_weight(mod.weight, hessians[name].h, bits=plan[full], **opts)
                mod.weight.copy_(dequantize_weight(packed, mod.weight.dtype))
                out[full] = packed
        # This block's outputs, now through quantized weights, are the next block's inputs.
        inputs = [((layer(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
        if progress is not None:
            progress(f"layers.{i}")
    if config.lm_head and plan.get("lm_head") is not None:
        # The head's inputs are the final-norm hidden states of the (quantized) last block.
        h = Hessian(model.lm_head.in_features, model.lm_head.weight.device)
        for args, _ in inputs:
            h.add(model.norm(args[0]))
        out["lm_head"] = gptq_weight(model.lm_head.weight, h.h, bits=plan["lm_head"], **opts)
    return out


# true_sequential: a block's linears in the order its data reaches them; each stage's Hessians are
# collected with the earlier stages already quantized. Linears of other names come last.
_STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _stages(targets: dict[str, nn.Module]) -> list[list[str]]:
    leaf = {name: name.rpartition(".")[2] for name in targets}
    stages = [[n for n in targets if leaf[n] in stage] for stage in _STAGES]
    rest = [n for n in targets if not any(leaf[n] in stage for stage in _STAGES)]
    return [s for s in [*stages, rest] if s]
