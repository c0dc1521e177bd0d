"""The runtime twins of nn.Linear and nn.Embedding over MatMulNBits-packed weights.

`QuantLinear` holds exactly the tensors onnxruntime's ``com.microsoft::MatMulNBits`` takes
(packing.py) and computes ``x @ dequantize(W).T + bias`` through one of these backends:

- ``reference``: dequantize the whole weight in float32 on every call. The definition.
- ``cached``: dequantize once per (device, dtype) and keep the float weight: the same numbers as
  ``reference`` at float matmul speed, at float memory cost.
- ``int4pack``: PyTorch's int4 kernels (``_weight_int4pack_mm_for_cpu`` on CPU,
  ``_weight_int4pack_mm`` on CUDA) on the weight repacked once; activations run in bfloat16, so
  results match ``reference`` to bf16 precision. 4-bit weights only.

``accuracy_level`` is MatMulNBits' attribute of the same name: 0 computes with the float
activations; 4 lets onnxruntime's CPU kernel quantize the activations to int8 per block of
``block_size`` (symmetric, scale max|x| / 127) and multiply in integers — several times faster for
decoding. The ``reference`` and ``cached`` backends emulate level 4 exactly (matching onnxruntime
to ~1e-6), so a model exported at level 4 has a PyTorch twin that computes the same numbers.

``auto`` (the default) picks ``int4pack`` for 4-bit weights when the activations are bfloat16
(no precision is lost that the model doesn't lose already) or on CUDA, and ``cached`` otherwise.
Force one with `set_backend` (a context manager) or the ``DS_QUANT_BACKEND`` environment variable.

Under ``torch.onnx.export`` both modules emit their onnxruntime contrib op (MatMulNBits,
GatherBlockQuantized) through an autograd.Function ``symbolic``, with the stored tensors as
initializers: exporting never re-quantizes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ds_quant.errors import DsQuantError
from ds_quant.packing import (
    PackedWeight,
    check_format,
    dequantize_weight,
    n_blocks_for,
    unpack_codes,
    unpacked_codes,
    zero_point_values,
)

BACKENDS = ("auto", "reference", "cached", "int4pack")
_forced: list[str] = []


@contextlib.contextmanager
def set_backend(name: str) -> Iterator[None]:
    """Force a QuantLinear backend inside the block (tests, benchmarks, verify)."""
    if name not in BACKENDS:
        raise DsQuantError(f"backend: unknown {name!r}; expected one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def current_backend() -> str:
    if _forced:
        return _forced[-1]
    name = os.environ.get("DS_QUANT_BACKEND", "auto")
    if name not in BACKENDS:
        raise DsQuantError(f"DS_QUANT_BACKEND: unknown {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def int4pack_supported(bits: int, block_size: int, in_features: int, out_features: int) -> bool:
    # Constraints of aten's int4pack kernels: group size, K a whole number of groups and of
    # the 16 * inner_k_tiles tile, N a multiple of 8.
    return (
        bits == 4
        and block_size in (32, 64, 128, 256)
        and in_features % block_size == 0
        and in_features % 128 == 0
        and out_features % 8 == 0
    )


# --- ONNX symbolics ---------------------------------------------------------------------------


def _with_last_dim(y, x, n: int):
    """Tell the TorchScript exporter the output type of a contrib op: x's shape with last dim n."""
    sizes = x.type().sizes()
    return y if sizes is None else y.setType(x.type().with_sizes([*sizes[:-1], n]))


def quantize_activations(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """What MatMulNBits accuracy_level 4 does to its input on CPU: int8 per block of K, dequantized.

    x (..., K) -> (..., K): blocks of block_size values (zero-padded at the end of K) share a scale
    max|x| / 127; values are rounded half-to-even to integers in [-127, 127].
    """
    k = x.shape[-1]
    n_blocks = n_blocks_for(k, block_size)
    xb = F.pad(x.float(), (0, n_blocks * block_size - k)).unflatten(-1, (n_blocks, block_size))
    scale = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q * scale).flatten(-2)[..., :k].to(x.dtype)


class _MatMulNBits(torch.autograd.Function):
    """x @ W.T with W in MatMulNBits layout; exports as com.microsoft::MatMulNBits."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zero_points, k: int, n: int, bits: int, block_size: int, level: int):
        packed = PackedWeight(qweight, scales, zero_points, bits, block_size, k)
        if level == 4:
            x = quantize_activations(x, block_size)
        return F.linear(x, dequantize_weight(packed, x.dtype))

    @staticmethod
    def symbolic(g, x, qweight, scales, zero_points, k: int, n: int, bits: int, block_size: int, level: int):
        flat_scales = g.op("Reshape", scales, g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64)))
        inputs = [x, qweight, flat_scales]
        if zero_points is not None and not zero_points.node().mustBeNone():
            inputs.append(zero_points)
        attrs = dict(K_i=k, N_i=n, bits_i=bits, block_size_i=block_size)
        if level:
            attrs["accuracy_level_i"] = level
        y = g.op("com.microsoft::MatMulNBits", *inputs, **attrs)
        return _with_last_dim(y, x, n)


class _GatherBlockQuantized(torch.autograd.Function):
    """Rows of a MatMulNBits-packed (vocab, d) table; exports as com.microsoft::GatherBlockQuantized."""

    @staticmethod
    def forward(ctx, ids, data, scales, zero_points, dim: int, bits: int, block_size: int):
        return _dequantize_rows(ids, data, scales, zero_points, dim, bits, block_size)

    @staticmethod
    def symbolic(g, ids, data, scales, zero_points, dim: int, bits: int, block_size: int):
        inputs = [data, ids, scales]
        if zero_points is not None and not zero_points.node().mustBeNone():
            inputs.append(zero_points)
        y = g.op(
            "com.microsoft::GatherBlockQuantized",
            *inputs,
            gather_axis_i=0,
            quantize_axis_i=1,
            block_size_i=block_size,
            bits_i=bits,
        )
        padded = scales.type().sizes()[1] * block_size
        if padded != dim:  # rows were zero-padded to whole blocks: cut back to d_model
            const = lambda v: g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64))  # noqa: E731
            y = g.op("Slice", y, const(0), const(dim), const(-1))
        sizes = ids.type().sizes()
        return y if sizes is None else y.setType(scales.type().with_sizes([*sizes, dim]))


def _dequantize_rows(ids, data, scales, zero_points, dim: int, bits: int, block_size: int) -> torch.Tensor:
    """Dequantize only the looked-up rows: data (V, n_blocks * blob) -> (..., dim) in the scales' dtype."""
    n_blocks = scales.shape[1]
    rows = data[ids].view(*ids.shape, n_blocks, -1)  # (..., n_blocks, blob)
    codes = unpack_codes(rows, bits, block_size).float()  # (..., n_blocks, block_size)
    if zero_points is None:  # symmetric: MatMulNBits' default zero point, a Python scalar (no
        zero = float(2 ** (bits - 1))  # host-to-device copy: CUDA graphs capture this)
    else:
        zero = unpack_codes(zero_points[ids], bits, n_blocks).float()[..., None]  # (..., n_blocks, 1)
    w = (codes - zero) * scales[ids].float()[..., None]
    return w.flatten(-2)[..., :dim].to(scales.dtype)


# --- modules ----------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """Weight-only quantized nn.Linear: buffers ``qweight``, ``scales``, ``zero_points``, ``bias``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        block_size: int,
        sym: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_format(bits, block_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block_size = bits, block_size
        n_blocks = n_blocks_for(in_features, block_size)
        blob = block_size * bits // 8
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("qweight", torch.zeros(out_features, n_blocks, blob, **u8))  # type: ignore[arg-type]
        self.register_buffer("scales", torch.ones(out_features, n_blocks, device=device))
        zp_cols = -(-n_blocks * bits // 8)
        self.register_buffer("zero_points", None if sym else torch.zeros(out_features, zp_cols, **u8))  # type: ignore[arg-type]
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.accuracy_level = 0  # 0: float activations; 4: int8 activations (MatMulNBits on CPU)
        self._cache: dict[str, object] = {}
        # The int4pack backend's weight and (scale, offset) tensors, built by `prepare` (eagerly on
        # .to(device) / load_state_dict) so that forward under torch.compile only reads them. Buffers,
        # not plain attributes: CUDA graphs treat buffers as static inputs (no copy per replay).
        self.register_buffer("int4_weight", None, persistent=False)
        self.register_buffer("int4_scale_offset", None, persistent=False)
        self._int4_key: tuple | None = None
        self.lookup_only = False  # an untied embedding table: rows are gathered, never multiplied

    @property
    def sym(self) -> bool:
        return self.zero_points is None

    @property
    def weight(self) -> torch.Tensor:
        """The packed uint8 weight, for code that reads ``.weight.device`` (e.g. ds_core.SparseMLP).

        It is not a float matrix: use `dequantized_weight` for that.
        """
        return self.qweight

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        m = cls(
            packed.in_features,
            packed.out_features,
            bits=packed.bits,
            block_size=packed.block_size,
            sym=packed.sym,
            bias=bias is not None,
            device=packed.qweight.device,
        )
        m.qweight.copy_(packed.qweight)
        m.scales.copy_(packed.scales)
        if packed.zero_points is not None:
            m.zero_points.copy_(packed.zero_points)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        m.prepare()
        return m

    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.qweight, self.scales, self.zero_points, self.bits, self.block_size, self.in_features
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (out_features, in_features) weight these buffers stand for."""
        return dequantize_weight(self.packed(), dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"block_size={self.block_size}, sym={self.sym}, bias={self.bias is not None}"
            + (f", accuracy_level={self.accuracy_level}" if self.accuracy_level else "")
        )

    # -- forward --

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features) -> (..., out_features)
        if torch.compiler.is_compiling():
            return self._forward_traced(x)
        if torch.onnx.is_in_onnx_export():
            y = _MatMulNBits.apply(
                x, self.qweight, self.scales, self.zero_points, self.in_features, self.out_features, self.bits,
                self.block_size, self.accuracy_level,
            )  # fmt: skip
            return y if self.bias is None else y + self.bias
        backend = self._pick_backend(x)
        if backend == "int4pack":
            self._ensure_int4pack(x.device)
            y = self._int4pack_mm(x)
        else:
            if self.accuracy_level == 4:
                x = quantize_activations(x, self.block_size)
            w = self.dequantized_weight(x.dtype) if backend == "reference" else self._cached_weight(x)
            y = F.linear(x, w)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_traced(self, x: torch.Tensor) -> torch.Tensor:
        """forward under torch.compile: no cache keys (data_ptr / _version are not traceable).

        Uses the int4pack weights `prepare` built when the module was moved or loaded (CUDA, or a
        bfloat16 model on CPU); otherwise dequantizes inside the graph (``reference``, which the
        compiler fuses into the matmul's producer).
        """
        if self.int4_weight is not None and self.int4_weight.device == x.device:
            y = self._int4pack_mm(x)
        else:
            if self.accuracy_level == 4:
                x = quantize_activations(x, self.block_size)
            y = F.linear(x, self.dequantized_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _pick_backend(self, x: torch.Tensor) -> str:
        name = current_backend()
        ok = int4pack_supported(self.bits, self.block_size, self.in_features, self.out_features)
        if name == "auto":
            return "int4pack" if ok and (x.dtype == torch.bfloat16 or x.is_cuda) else "cached"
        if name == "int4pack" and not ok:
            return "cached"  # 8-bit or odd shapes: the exact path
        return name

    def _key(self, kind: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple:
        # _version changes whenever the buffers are written in place (load_state_dict, copy_).
        return (kind, device, dtype, self.qweight.data_ptr(), self.qweight._version, self.scales._version)

    def _cached_weight(self, x: torch.Tensor) -> torch.Tensor:
        key = self._key("cached", x.device, x.dtype)
        if self._cache.get("key") != key:
            self._cache = {"key": key, "w": self.dequantized_weight(x.dtype).to(x.device)}
        return self._cache["w"]  # type: ignore[return-value]

    # -- int4pack --

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # .to(device / dtype), .cuda(), to_empty: buffers moved or cast
        self.prepare()
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare()  # the buffers were just overwritten in place

    @torch.no_grad()
    def prepare(self) -> None:
        """Build the int4pack weights now where forward will use them: on CUDA, or with bfloat16
        scales on CPU (a model cast to bfloat16), for 4-bit shapes the kernels take, unless a
        backend other than auto / int4pack is forced. Called on every move / load; idempotent.
        """
        self.int4_weight = self.int4_scale_offset = self._int4_key = None
        q = self.qweight
        if q.device.type == "meta" or self.lookup_only or current_backend() not in ("auto", "int4pack"):
            return
        if not int4pack_supported(self.bits, self.block_size, self.in_features, self.out_features):
            return
        if q.is_cuda or self.scales.dtype == torch.bfloat16:
            self._ensure_int4pack(q.device)

    def _ensure_int4pack(self, device: torch.device) -> None:
        key = self._key("int4pack", device)
        if self._int4_key == key:
            return
        codes = unpacked_codes(self.packed()).flatten(1)  # (N, K) uint8 in 0..15
        zero = zero_point_values(self.packed())  # (N, n_blocks)
        # aten's int4 formula is (q - 8) * scale + offset; ours is (q - zp) * scale.
        scales = self.scales.float()
        offset = (8 - zero) * scales
        sz = torch.stack([scales.t(), offset.t()], dim=-1).to(torch.bfloat16).contiguous()
        if device.type == "cuda":
            # The CUDA kernel takes two codes per byte with the even index in the HIGH nibble.
            hi_first = (codes[:, 0::2] << 4) | codes[:, 1::2]
            w = torch.ops.aten._convert_weight_to_int4pack(hi_first.to(device).contiguous(), 8)
        else:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
        self.int4_weight, self.int4_scale_offset = w, sz.to(device)
        self._int4_key = key
        if device.type == "cuda":  # CUDA-graph inputs that never move (as ds_models' fused qkv)
            for t in (self.int4_weight, self.int4_scale_offset, self.bias):
                if t is not None:
                    torch._dynamo.mark_static_address(t)

    def _int4pack_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()  # the CUDA kernel needs a dense A
        if x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(
                x2, self.int4_weight, self.block_size, self.int4_scale_offset
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.int4_weight, self.block_size, self.int4_scale_offset
            )
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """nn.Embedding over a MatMulNBits-packed (vocab, d_model) table.

    With tied embeddings the table is the lm_head's: ``QuantEmbedding(tied_to=lm_head)`` reads that
    QuantLinear's buffers, so the bytes exist once in memory, in the safetensors file and in the
    ONNX model (GatherBlockQuantized and MatMulNBits share one initializer).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bits: int,
        block_size: int,
        sym: bool = True,
        tied_to: QuantLinear | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if tied_to is not None:
            if (tied_to.out_features, tied_to.in_features) != (num_embeddings, embedding_dim):
                raise DsQuantError(
                    f"embed_tokens: tied lm_head is ({tied_to.out_features}, {tied_to.in_features}), "
                    f"expected ({num_embeddings}, {embedding_dim})"
                )
            # A tuple keeps the lm_head out of this module's children: its buffers are saved once.
            self._tied: tuple[QuantLinear, ...] = (tied_to,)
            self.table = None
        else:
            self._tied = ()
            self.table = QuantLinear(
                embedding_dim, num_embeddings, bits=bits, block_size=block_size, sym=sym, device=device
            )
            self.table.lookup_only = True

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    @property
    def source(self) -> QuantLinear:
        return self._tied[0] if self._tied else self.table  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return self.source.bits

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor with the device and dtype of the looked-up rows (the scales' dtype).

        ds_models.generate reads ``model.embed_tokens.weight.device/.dtype`` to size its KV cache.
        """
        s = self.source.scales
        return s.new_empty(0)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, tied={self.tied}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d_model) float32
        s = self.source
        data = s.qweight.view(s.out_features, -1)  # (V, n_blocks * blob): GatherBlockQuantized wants 2-D
        args = (ids, data, s.scales, s.zero_points, self.embedding_dim, s.bits, s.block_size)
        if torch.onnx.is_in_onnx_export():
            return _GatherBlockQuantized.apply(*args)
        return _dequantize_rows(*args)
