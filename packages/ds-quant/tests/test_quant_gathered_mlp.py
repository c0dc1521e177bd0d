"""Static-sparse MLPs are quantized as the dense MLP of their kept neurons (gathered_mlp.py)."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import yaml

from ds_quant import DsQuantError, export_directory, load_quantized, quantize, save_quantized, set_backend
from ds_quant.evaluate import verify
from ds_quant.gathered_mlp import GatheredMLP, gather_static_mlps


def _static(make_tiny, **kw):
    # d_ff 1024: ds-core keeps 768 (717 rounded up to a multiple of 64), the quickstart's rule.
    return make_tiny(scale=2.0, sparse_ratio=0.3, sparsity_mode="static", d_ff=1024, **kw)


def test_quant_gathering_keeps_the_function(make_tiny):
    model = _static(make_tiny)
    keep = model.layers[0].mlp.static_keep_indices()
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        ref = model(x)
        gathered = copy.deepcopy(model)
        assert gather_static_mlps(gathered) == {"layers.0.mlp": 768, "layers.1.mlp": 768}
        got = gathered(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    mlp = gathered.layers[0].mlp
    assert isinstance(mlp, GatheredMLP) and mlp.gate_proj.weight.shape == (768, 64)
    torch.testing.assert_close(mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight[keep])
    torch.testing.assert_close(mlp.down_proj.weight, model.layers[0].mlp.down_proj.weight[:, keep])
    # A different neuron set would change the function: the test above is not vacuous.
    with torch.no_grad():
        model.layers[0].mlp.neuron_score.neg_()
        assert (model(x) - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quant_static_sparse_directory_holds_kept_rows_only(tmp_path, make_tiny, text_file, method):
    model = _static(make_tiny)
    calib = torch.randint(0, 512, (8, 32)) if method == "gptq" else None
    q = quantize(copy.deepcopy(model), 4, 32, method=method, calibration=calib)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad(), set_backend("reference"):
        ref_f, got_q = model(x), q(x)
    # int4 of the gathered MLP is still the same model, up to 4-bit rounding.
    assert (got_q - ref_f).abs().max() < 0.2 * ref_f.abs().max()

    save_quantized(q, tmp_path / "q")
    quant = yaml.safe_load((tmp_path / "q" / "quant.yaml").read_text())
    assert quant["gathered_mlps"] == {"layers.0.mlp": 768, "layers.1.mlp": 768}
    loaded = load_quantized(tmp_path / "q")
    gate = loaded.layers[1].mlp.gate_proj
    assert (gate.out_features, tuple(gate.qweight.shape)) == (768, (768, 2, 16))
    assert loaded.layers[1].mlp.down_proj.in_features == 768
    assert not any("neuron_score" in k for k in loaded.state_dict())
    with torch.no_grad(), set_backend("reference"):
        torch.testing.assert_close(loaded(x), got_q, rtol=0, atol=0)

    out = export_directory(tmp_path / "q", tmp_path / "onnx")
    r = verify(out, n_prompts=2, seq_len=10)
    assert r["passed"], r
    proto = onnx.load(str(out / "model.onnx"))
    n_of = {
        n.name: {a.name: a.i for a in n.attribute}["N"]
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert sorted(v for k, v in n_of.items() if "gate_proj" in k or "up_proj" in k) == [768] * 4, n_of
    assert not any("mask" in t.name for t in proto.graph.initializer)  # no 0/1 neuron mask either


def test_quant_static_sparse_int4_onnx_shrinks_like_the_fp32_one(tmp_path, make_tiny):
    """The int4 ONNX of a static-sparse model is as small, relative to its fp32 ONNX (which stores
    only the kept neurons), as a dense model's int4 is to its fp32: nothing dropped is stored."""
    sizes = {}
    for name, model in (("sparse", _static(make_tiny)), ("dense", make_tiny(scale=2.0, d_ff=768))):
        model.save_pretrained(tmp_path / name)
        for bits in (32, 4):
            out = export_directory(tmp_path / name, tmp_path / f"{name}-{bits}", bits=bits, group_size=32)
            sizes[name, bits] = (out / "model.onnx").stat().st_size
    # The dense model of d_ff 768 has the sparse model's kept shapes: same bytes within the graph's
    # few extra nodes / mask constants.
    assert sizes["sparse", 4] == pytest.approx(sizes["dense", 4], rel=0.01), sizes
    ratio = sizes["sparse", 4] / sizes["sparse", 32]
    assert ratio < 0.2, sizes
    assert ratio == pytest.approx(sizes["dense", 4] / sizes["dense", 32], rel=0.02), sizes


def test_quant_gathered_mlps_bad_quant_yaml(tmp_path, make_tiny):
    save_quantized(quantize(_static(make_tiny), 4, 32), tmp_path / "q")
    path = tmp_path / "q" / "quant.yaml"
    quant = yaml.safe_load(path.read_text())
    for bad, match in (
        ({"layers.0.self_attn": 768}, "layers.0.self_attn: not a static-sparse MLP"),
        ({"layers.0.mlp": 2048, "layers.1.mlp": 768}, "2048 kept neurons > d_ff 1024"),
        ({"layers.0.mlp": "wide"}, "gathered_mlps: expected a mapping"),
    ):
        path.write_text(yaml.safe_dump({**quant, "gathered_mlps": bad}))
        with pytest.raises(DsQuantError, match=match):
            load_quantized(tmp_path / "q")
    # Without the record the directory no longer matches its weights: a clear error, not garbage.
    path.write_text(yaml.safe_dump({k: v for k, v in quant.items() if k != "gathered_mlps"}))
    with pytest.raises(DsQuantError, match=r"model\.safetensors"):
        load_quantized(tmp_path / "q")


def test_quant_refuses_activation_sparse_attention_projections(tmp_path, make_tiny):
    # sparse_projections: all makes q/k/v/o ds-core DynamicSparseLinear; a QuantLinear in their
    # place would compute them densely, and ONNX has no op for them: both entry points refuse
    from ds_quant import export_onnx

    model = make_tiny(sparse_ratio=0.5, sparse_projections="all")
    with pytest.raises(DsQuantError, match="sparse_projections: 'all'"):
        quantize(model, bits=4, group_size=32)
    with pytest.raises(DsQuantError, match="sparse_projections: 'all'"):
        export_onnx(model, tmp_path / "m.onnx")
    assert type(model.layers[0].self_attn.q_proj).__name__ == "DynamicSparseLinear"  # left as it was
    quantize(make_tiny(sparse_ratio=0.5), bits=4, group_size=32)  # the MLP-only model still quantizes
