"""Group-wise weight quantization in onnxruntime's ``com.microsoft::MatMulNBits`` layout.

This file is the living definition of ds-quant's number format. A linear weight ``W`` of shape
(N, K) = (out_features, in_features) is cut along K into blocks of ``block_size`` values; each
(row, block) pair has one float scale and one integer zero point, and

    W[n, k] = (code[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]

with ``code`` an unsigned ``bits``-bit integer. The tensors are stored exactly as MatMulNBits
takes them, so the ONNX exporter copies bytes and never re-quantizes:

- ``qweight``: uint8 (N, n_blocks, blob_size), blob_size = block_size * bits / 8. For 4 bits two
  codes share a byte, the lower-index code in the low nibble.
- ``scales``: float32 (N, n_blocks) (MatMulNBits flattens it to N * n_blocks).
- ``zero_points``: uint8 (N, ceil(n_blocks * bits / 8)), packed like ``qweight``; ``None`` when
  symmetric, where the op's default 2**(bits - 1) applies.

K that is not a multiple of block_size is zero-padded up to n_blocks * block_size (the pad codes
dequantize to exactly 0). Symmetric scales follow onnxruntime / llama.cpp Q4_0: the value of
largest magnitude maps to code 0 exactly (scale = that value / -2**(bits-1), so the scale may be
negative), which uses all 2**bits levels instead of 2**bits - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_quant.errors import DsQuantError

SUPPORTED_BITS = (4, 8)
"""Bit widths ds-quant stores as MatMulNBits. (16 and 32 mean "keep a float weight".)"""


def check_format(bits: int, block_size: int, *, where: str = "bits") -> None:
    """Raise DsQuantError unless (bits, block_size) is a MatMulNBits format ds-quant writes."""
    if bits not in SUPPORTED_BITS:
        raise DsQuantError(f"{where}: unsupported bit width {bits!r}; expected one of {SUPPORTED_BITS}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise DsQuantError(
            f"group_size: unsupported group size {block_size!r}; expected a power of two >= 16 "
            "(MatMulNBits block_size)"
        )


@dataclass
class PackedWeight:
    """One linear weight in MatMulNBits layout (see the module docstring)."""

    qweight: torch.Tensor  # uint8 (N, n_blocks, blob_size)
    scales: torch.Tensor  # float32 (N, n_blocks)
    zero_points: torch.Tensor | None  # uint8 (N, ceil(n_blocks * bits / 8)) or None (symmetric)
    bits: int
    block_size: int
    in_features: int  # K, before padding

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.qweight.shape[1]

    @property
    def sym(self) -> bool:
        return self.zero_points is None

    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.numel()
        return self.qweight.numel() + 4 * self.scales.numel() + zp


def n_blocks_for(in_features: int, block_size: int) -> int:
    return -(-in_features // block_size)


# --- codes <-> bytes --------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (..., L) into uint8 (..., L * bits / 8), low nibble first for 4 bits."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 (..., B) -> uint8 codes (..., length)."""
    if bits == 8:
        return packed[..., :length]
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :length]


# --- quantization parameters ------------------------------------------------------------------


# Clip search: range shrink factors tried per group, and the error norm they are judged by (as in
# the GPTQ reference implementation's MSE quantizer, whose exponent 2.4 weighs large errors more).
CLIP_GRID = tuple(1.0 - i / 100 for i in range(21))  # 1.00, 0.99, ..., 0.80
CLIP_NORM = 2.4


def group_params(
    w: torch.Tensor, bits: int, sym: bool, *, clip_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point for groups along the last axis of w (..., G) -> (...), (...).

    The zero point is returned as a float tensor holding integers (so GPTQ can use it directly).
    clip_search: shrink each group's range by the factor in CLIP_GRID that minimises its rounding
    error (sum |w - dequantize(quantize(w))|^CLIP_NORM): clipping a few outliers buys a finer step
    for every other value of the group.
    """
    w = w.float()
    scale, zero = _range_params(w.amin(dim=-1), w.amax(dim=-1), bits, sym)
    if clip_search:
        best = torch.full_like(scale, float("inf"))
        for shrink in CLIP_GRID:
            s, z = _range_params(w.amin(dim=-1) * shrink, w.amax(dim=-1) * shrink, bits, sym)
            err = (dequantize_codes(quantize_codes(w, s[..., None], z[..., None], bits), s[..., None],
                                    z[..., None]) - w).abs_().pow_(CLIP_NORM).sum(dim=-1)  # fmt: skip
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _range_params(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    if sym:
        signed_absmax = torch.where(wmax.abs() >= wmin.abs(), wmax, wmin)
        scale = signed_absmax / -(2 ** (bits - 1))
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
        scale = (wmax - wmin) / maxq
        zero = torch.where(scale == 0, torch.zeros_like(scale), torch.round(-wmin / scale)).clamp(0, maxq)
    # An all-zero group: any scale works (every code equals the zero point); 1 avoids 0/0.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes for w given broadcastable scale and zero (float tensor of integers)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero) * scale


# --- whole weights ----------------------------------------------------------------------------


def pack_weight(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, sym: bool, in_features: int
) -> PackedWeight:
    """Build a PackedWeight from unpacked codes (N, n_blocks, block_size), scales and zeros (N, n_blocks)."""
    block_size = codes.shape[2]
    check_format(bits, block_size)
    qweight = pack_codes(codes, bits)  # (N, n_blocks, blob_size)
    zero_points = None if sym else pack_codes(zeros.round(), bits)  # (N, ceil(n_blocks * bits / 8))
    return PackedWeight(qweight, scales.float().contiguous(), zero_points, bits, block_size, in_features)


def quantize_weight(
    w: torch.Tensor, bits: int, block_size: int, sym: bool = True, *, clip_search: bool = False
) -> PackedWeight:
    """Round-to-nearest group-wise quantization of a (N, K) weight into MatMulNBits layout."""
    check_format(bits, block_size)
    if w.dim() != 2:
        raise DsQuantError(
            f"weight: expected a 2-D (out_features, in_features) tensor, got shape {tuple(w.shape)}"
        )
    n, k = w.shape
    n_blocks = n_blocks_for(k, block_size)
    w = torch.nn.functional.pad(w.detach().float(), (0, n_blocks * block_size - k))
    w = w.view(n, n_blocks, block_size)  # (N, n_blocks, block_size)
    scale, zero = group_params(w, bits, sym, clip_search=clip_search)  # (N, n_blocks) each
    codes = quantize_codes(w, scale[..., None], zero[..., None], bits)
    return pack_weight(codes, scale, zero, bits=bits, sym=sym, in_features=k)


def zero_point_values(p: PackedWeight) -> torch.Tensor:
    """Integer zero points (N, n_blocks) as float, expanding the symmetric default."""
    if p.zero_points is None:
        return torch.full(p.scales.shape, float(2 ** (p.bits - 1)), device=p.scales.device)
    return unpack_codes(p.zero_points, p.bits, p.n_blocks).float()


def unpacked_codes(p: PackedWeight) -> torch.Tensor:
    """Codes (N, n_blocks, block_size) as uint8."""
    return unpack_codes(p.qweight, p.bits, p.block_size)


def dequantize_weight(p: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float (N, K) weight a PackedWeight stands for (the reference every fast path must match)."""
    codes = unpacked_codes(p)  # (N, n_blocks, block_size)
    w = dequantize_codes(codes, p.scales[..., None], zero_point_values(p)[..., None])
    return w.flatten(1)[:, : p.in_features].to(dtype)
