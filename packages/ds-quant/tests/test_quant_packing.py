"""The MatMulNBits layout: our packed tensors against onnxruntime's own kernels and quantizer."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from ds_quant import DsQuantError, PackedWeight, dequantize_weight, quantize_weight
from ds_quant.packing import pack_codes, unpack_codes, unpacked_codes

ORT_QUANTIZE = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}


def _session(nodes, inputs, outputs, inits) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def ort_matmul_nbits(p: PackedWeight, x: np.ndarray) -> np.ndarray:
    """One MatMulNBits node over p's tensors, exactly as the exporter wires them."""
    inits = [
        numpy_helper.from_array(p.qweight.numpy(), "B"),
        numpy_helper.from_array(p.scales.reshape(-1).numpy(), "S"),
    ]
    names = ["A", "B", "S"]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points.numpy(), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft",
                            K=p.in_features, N=p.out_features, bits=p.bits, block_size=p.block_size)  # fmt: skip
    sess = _session([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, p.in_features])],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, p.out_features])], inits)  # fmt: skip
    return sess.run(None, {"A": x})[0]


def ort_quantize(w: torch.Tensor, bits: int, block: int, sym: bool) -> PackedWeight:
    """onnxruntime's own block quantizer (what its MatMulNBitsQuantizer uses), as a PackedWeight."""
    n, k = w.shape
    kb = -(-k // block)
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, -(-kb * bits // 8)), np.uint8)
    ORT_QUANTIZE[bits](packed, np.ascontiguousarray(w.t().numpy()), scales, zp, block, n, k, sym)
    return PackedWeight(torch.from_numpy(packed), torch.from_numpy(scales), None if sym else torch.from_numpy(zp),
                        bits, block, k)  # fmt: skip


CASES = [
    (bits, sym, k, block)
    for bits in (4, 8)
    for sym in (True, False)
    for k, block in ((256, 32), (200, 32), (96, 16))
]


@pytest.mark.parametrize(("bits", "sym", "k", "block"), CASES)
def test_quant_packed_weight_runs_in_matmulnbits(bits, sym, k, block):
    # (200, 32) pads K to 7 blocks: an odd block count exercises the half-filled zero-point byte.
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    w = torch.randn(48, k, generator=gen)
    x = torch.randn(5, k, generator=gen)
    p = quantize_weight(w, bits, block, sym)
    assert p.qweight.shape == (48, -(-k // block), block * bits // 8) and p.qweight.dtype == torch.uint8
    ref = (x @ dequantize_weight(p).T).numpy()
    np.testing.assert_allclose(ort_matmul_nbits(p, x.numpy()), ref, rtol=1e-5, atol=1e-4)
    # Quantization error is bounded by half a step (plus the one clipped level of symmetric mode).
    step = p.scales.abs().repeat_interleave(block, dim=1)[:, :k]
    assert ((w - dequantize_weight(p)).abs() <= step * (1.0 if sym else 0.5) + 1e-6).all()


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (4, False), (8, True), (8, False)])
def test_quant_rtn_is_byte_identical_to_onnxruntime_quantizer(bits, sym):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits + sym))
    ours, theirs = quantize_weight(w, bits, 32, sym), ort_quantize(w, bits, 32, sym)
    assert torch.equal(ours.qweight, theirs.qweight)
    assert torch.equal(ours.scales, theirs.scales)
    if not sym:
        assert torch.equal(ours.zero_points, theirs.zero_points)


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (4, False), (8, False)])
def test_quant_layout_reading_matches_onnxruntime_on_its_own_tensors(bits, sym):
    # onnxruntime packs, onnxruntime multiplies; our unpacking of those bytes must agree.
    gen = torch.Generator().manual_seed(7)
    w, x = torch.randn(40, 200, generator=gen), torch.randn(3, 200, generator=gen)
    p = ort_quantize(w, bits, 32, sym)
    np.testing.assert_allclose(
        (x @ dequantize_weight(p).T).numpy(), ort_matmul_nbits(p, x.numpy()), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (4, False), (8, True), (8, False)])
def test_quant_gather_block_quantized_reads_the_shared_table(bits, sym):
    # The tied embedding reads the lm_head's MatMulNBits bytes, viewed as (vocab, d_model * bits / 8).
    from ds_quant import QuantEmbedding, QuantLinear

    w = torch.randn(100, 64, generator=torch.Generator().manual_seed(3))
    head = QuantLinear.from_packed(quantize_weight(w, bits, 32, sym))
    emb = QuantEmbedding(100, 64, bits=bits, block_size=32, sym=sym, tied_to=head)
    ids = torch.tensor([[0, 5, 99], [3, 3, 1]])
    inits = [
        numpy_helper.from_array(head.qweight.reshape(100, -1).numpy(), "D"),
        numpy_helper.from_array(head.scales.numpy(), "S"),
    ]
    names = ["D", "I", "S"]
    if not sym:
        inits.append(numpy_helper.from_array(head.zero_points.numpy(), "Z"))
        names.append("Z")
    node = helper.make_node("GatherBlockQuantized", names, ["Y"], domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=32, bits=bits)  # fmt: skip
    sess = _session([node], [helper.make_tensor_value_info("I", TensorProto.INT64, [None, None])],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    got = sess.run(None, {"I": ids.numpy()})[0]
    np.testing.assert_array_equal(got, emb(ids).numpy())
    torch.testing.assert_close(emb(ids), head.dequantized_weight()[ids], rtol=0, atol=0)


def test_quant_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (3, 5, 33), generator=gen, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 33), codes)
    packed = pack_codes(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0x21, 0x03]]  # the lower-index code sits in the low nibble


def test_quant_all_zero_groups_dequantize_to_zero():
    w = torch.zeros(8, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    for sym in (True, False):
        p = quantize_weight(w, 4, 32, sym)
        assert torch.isfinite(p.scales).all()
        assert torch.equal(dequantize_weight(p)[1:], w[1:])
        assert unpacked_codes(p).shape == (8, 2, 32)


@pytest.mark.parametrize(("bits", "block"), [(3, 32), (16, 32), (4, 100), (4, 8)])
def test_quant_rejects_unsupported_formats(bits, block):
    with pytest.raises(DsQuantError, match=r"bits|group"):
        quantize_weight(torch.randn(8, 64), bits, block)
