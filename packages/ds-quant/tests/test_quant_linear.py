"""QuantLinear: every backend against the reference definition; the int8-activation emulation."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ds_quant import DsQuantError, QuantLinear, quantize_weight, set_backend
from ds_quant.quant_linear import current_backend, int4pack_supported, quantize_activations


def _layer(bits=4, sym=True, n=256, k=512, block=128, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_packed(quantize_weight(w, bits, block, sym), b)


@pytest.mark.parametrize("sym", [True, False])
def test_quant_linear_reference_is_float_matmul_of_dequantized_weight(sym):
    m = _layer(sym=sym)
    x = torch.randn(2, 3, 512)
    with set_backend("reference"):
        y = m(x)
    torch.testing.assert_close(y, x @ m.dequantized_weight().T + m.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (4, False), (8, True)])
def test_quant_linear_cached_equals_reference_and_tracks_weight_changes(bits, sym):
    m, other = _layer(bits, sym), _layer(bits, sym, seed=1)
    x = torch.randn(4, 512)
    with set_backend("reference"):
        ref = m(x)
    with set_backend("cached"):
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
        m.load_state_dict(other.state_dict())  # in-place copy: the cached weight must go stale
        torch.testing.assert_close(m(x), other(x), rtol=0, atol=0)


@pytest.mark.parametrize("sym", [True, False])
def test_quant_linear_int4pack_matches_reference_to_bf16_precision(sym):
    m = _layer(4, sym)
    assert int4pack_supported(4, 128, 512, 256)
    x = torch.randn(3, 5, 512)
    with set_backend("reference"):
        ref = m(x)
    with set_backend("int4pack"):
        got = m(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 2e-2, rel  # activations run in bfloat16
    with set_backend("auto"):  # float32 activations on CPU: auto takes the exact cached path
        torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)


def test_quant_linear_int4pack_falls_back_for_unsupported_shapes():
    m = _layer(4, n=40, k=200, block=32)  # K is not a whole number of 128-wide tiles
    assert not int4pack_supported(4, 32, 200, 40)
    x = torch.randn(2, 200)
    with set_backend("reference"):
        ref = m(x)
    with set_backend("int4pack"):
        torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)


def test_quant_linear_backend_switch_validates(monkeypatch):
    with pytest.raises(DsQuantError, match="backend"), set_backend("fast"):
        pass
    monkeypatch.setenv("DS_QUANT_BACKEND", "reference")
    assert current_backend() == "reference"
    with set_backend("cached"):
        assert current_backend() == "cached"
    monkeypatch.setenv("DS_QUANT_BACKEND", "bogus")
    with pytest.raises(DsQuantError, match="DS_QUANT_BACKEND"):
        current_backend()


@pytest.mark.parametrize(("bits", "sym", "k"), [(4, True, 512), (4, False, 200), (8, True, 512)])
def test_quant_linear_accuracy_level_4_emulates_onnxruntime(bits, sym, k):
    m = _layer(bits, sym, n=64, k=k, block=32, bias=False)
    x = torch.randn(3, k)
    p = m.packed()
    inits = [
        numpy_helper.from_array(p.qweight.numpy(), "B"),
        numpy_helper.from_array(p.scales.reshape(-1).numpy(), "S"),
    ]
    names = ["A", "B", "S"]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points.numpy(), "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=64, bits=bits,
                            block_size=32, accuracy_level=4)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 64])], inits)  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"A": x.numpy()}
    )[0]
    m.accuracy_level = 4
    with set_backend("reference"):
        emulated = m(x).numpy()
    m.accuracy_level = 0
    with set_backend("reference"):
        exact = m(x).numpy()
    scale = np.abs(exact).max()
    assert np.abs(got - emulated).max() / scale < 1e-5  # the emulation is onnxruntime's arithmetic
    assert np.abs(got - exact).max() / scale > 1e-4  # ...which really differs from float activations


def test_quant_activation_quantization_is_int8_per_block():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.3, 0.0, 0.0, 0.0, 0.0, 254.0, 1.0]])
    q = quantize_activations(x, 4)
    torch.testing.assert_close(q[:, 4:8], x[:, 4:8])  # an all-zero block stays zero
    step = 1.0 / 127.0  # first block: max |x| = 1
    torch.testing.assert_close(q[0, :4], torch.round(x[0, :4] / step) * step)
    # Last block (zero-padded to 4): max 254 -> step 2, so 1.0 lands on a tie and rounds to even (0).
    assert q[0, 8] == 254.0 and q[0, 9] == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the int4 GPU kernel")
def test_quant_linear_int4pack_cuda_matches_reference():
    m = _layer(4, False).cuda()
    x = torch.randn(3, 512, device="cuda")
    with set_backend("reference"):
        ref = m(x)
    with set_backend("int4pack"):
        got = m(x.bfloat16()).float()
    assert ((got - ref).abs().max() / ref.abs().max()) < 2e-2


def test_quant_linear_prepares_int4pack_eagerly_on_move_and_load():
    m = _layer(4, False)
    assert m.int4_weight is None  # float32 on CPU: auto runs the exact cached path, nothing to build
    m = m.to(torch.bfloat16)  # a bf16 model: auto will take int4pack, so .to() builds it now
    assert m.int4_weight is not None and m.int4_scale_offset.dtype == torch.bfloat16
    built = m.int4_weight
    other = _layer(4, False, seed=1).to(torch.bfloat16)
    m.load_state_dict(other.state_dict())  # new codes: rebuilt at load, not at the next forward
    assert m.int4_weight is not built and torch.equal(m.int4_weight, other.int4_weight)
    assert "int4_weight" not in m.state_dict()  # derived, never saved
    with set_backend("reference"):
        assert m.to(torch.float32).to(torch.bfloat16).int4_weight is None  # a forced backend: no build


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_linear_compiles_without_graph_breaks(dtype):
    """torch.compile(fullgraph=True) traces forward: prepared int4pack weights (bf16) or the
    in-graph dequantization (fp32), never the eager cache keys (data_ptr / _version)."""
    torch._dynamo.reset()
    m = _layer(4, True).to(dtype)
    x = torch.randn(2, 512, dtype=dtype)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)


def test_quant_model_forward_compiles_without_graph_breaks(make_tiny):
    from ds_quant import quantize

    torch._dynamo.reset()
    model = quantize(make_tiny(scale=1.0), 4, 32)  # QuantEmbedding (tied) + QuantLinear everywhere
    x = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        ref = model(x)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the int4 GPU kernel")
def test_quant_linear_cuda_compiled_int4pack():
    torch._dynamo.reset()
    m = _layer(4, False).cuda()
    assert m.int4_weight is not None and m.int4_weight.is_cuda  # built by .cuda(), not by forward
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    eager = m(x)
    got = torch.compile(m, fullgraph=True, mode="reduce-overhead")(x)
    torch.testing.assert_close(got, eager, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for CUDA graphs")
def test_quant_model_decodes_in_cuda_graph_and_compiled_on_cuda(make_tiny):
    from ds_models import generate
    from ds_quant import quantize

    torch._dynamo.reset()
    model = quantize(make_tiny(), 4, 32).cuda()  # tied QuantEmbedding: rows gathered inside the graph
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    eager = generate(model, prompts, max_new_tokens=12, mode="eager")
    assert generate(model, prompts, max_new_tokens=12, mode="cuda-graph") == eager
    assert generate(model, prompts, max_new_tokens=12, mode="compile") == eager
