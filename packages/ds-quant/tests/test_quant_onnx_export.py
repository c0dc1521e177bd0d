"""ONNX export with KV cache: parity with PyTorch in every bit width, generation, metadata, sparsity."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from ds_models import Transformer, generate
from ds_quant import (
    DsQuantError,
    OnnxModel,
    export_directory,
    export_onnx,
    load_quantized,
    quantize,
    save_quantized,
    set_backend,
)
from ds_quant.evaluate import verify


@pytest.mark.parametrize(
    ("bits", "sym"), [(32, True), (16, True), (8, True), (8, False), (4, True), (4, False)]
)
def test_quant_export_parity_every_bit_width(tmp_path, tiny_dir, bits, sym):
    out = export_directory(tiny_dir, tmp_path / "onnx", bits=bits, group_size=32, sym=sym)
    proto = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    if bits in (4, 8):
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "Gemm" not in ops
        node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == bits and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    else:
        assert "MatMulNBits" not in ops and "Gemm" in ops
    r = verify(out, n_prompts=3, seq_len=12)
    assert r["passed"], r
    # 4/8 bits: the graph with float activations against the exact twin, and the shipped graph.
    assert len(r["checks"]) == (2 if bits in (4, 8) else 1)
    assert r["checks"][0]["full"] <= (1e-4 if bits >= 16 else 1e-3)
    assert r["checks"][0]["cached"] <= (1e-4 if bits >= 16 else 1e-3)


def test_quant_export_sizes_shrink_with_bits(tmp_path, tiny_dir):
    sizes = {}
    for bits in (32, 16, 8, 4):
        out = export_directory(tiny_dir, tmp_path / str(bits), bits=bits, group_size=32)
        sizes[bits] = (out / "model.onnx").stat().st_size
    assert sizes[32] > sizes[16] > sizes[8] > sizes[4], sizes
    assert sizes[4] < 0.3 * sizes[32], sizes  # ds-tiny: graph and norms are a visible share


def _greedy_pair(model, onnx_dir, prompts, n):
    with set_backend("reference"):
        torch_out = generate(model, prompts, max_new_tokens=n)
    return torch_out, OnnxModel(onnx_dir).generate(prompts, n)


def test_quant_greedy_generation_matches_pytorch(tmp_path, tiny_dir):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [100, 3], [42, 17, 250, 8]]  # different lengths: left padding
    export_directory(tiny_dir, tmp_path / "fp32")
    torch_out, ort_out = _greedy_pair(Transformer.from_pretrained(tiny_dir), tmp_path / "fp32", prompts, 16)
    assert ort_out == torch_out
    assert len({t for row in torch_out for t in row}) > 8  # a real continuation, not one repeated token

    q = quantize(Transformer.from_pretrained(tiny_dir), 4, 32, sym=False)
    save_quantized(q, tmp_path / "q4", tokenizer=tiny_dir / "tokenizer.json")
    export_directory(tmp_path / "q4", tmp_path / "q4-onnx", accuracy_level=0)
    torch_out, ort_out = _greedy_pair(load_quantized(tmp_path / "q4"), tmp_path / "q4-onnx", prompts, 16)
    assert ort_out == torch_out


def test_quant_generate_stops_and_samples(tmp_path, tiny_dir):
    out = export_directory(tiny_dir, tmp_path / "o", bits=8, group_size=32)
    om = OnnxModel(out)
    greedy = om.generate([[1, 2, 3]], 8)[0]
    stopped = om.generate([[1, 2, 3], [4, 5]], 8, stop_tokens=[greedy[2]])
    assert stopped[0] == greedy[: greedy.index(greedy[2]) + 1]  # ends after its first stop token, kept
    assert len(stopped[1]) <= 8
    a = om.generate([[1, 2, 3]], 8, temperature=1.0, top_k=50, seed=1)
    assert a == om.generate([[1, 2, 3]], 8, temperature=1.0, top_k=50, seed=1)
    text = om.generate_text("The Python", max_new_tokens=5)
    assert isinstance(text, str) and text
    with pytest.raises(DsQuantError, match="vocabulary"):
        om.generate([[9999]], 2)


def test_quant_export_metadata_is_self_contained(tmp_path, tiny_dir):
    out = export_directory(tiny_dir, tmp_path / "o", bits=4, group_size=32, command="ds-quant export ...")
    for name in ("model.onnx", "config.yaml", "quant.yaml", "tokenizer.json", "provenance.json"):
        assert (out / name).exists(), name
    meta = {
        p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props
    }
    config = json.loads(meta["ds.config"])
    assert config["n_layers"] == 2 and config["vocab_size"] == 512
    assert json.loads(meta["ds.quant"])["bits"] == 4
    assert json.loads(meta["ds.export"])["bits"] == 4
    assert json.loads(meta["ds.tokenizer"]) == json.loads((tiny_dir / "tokenizer.json").read_text())
    assert "\n" not in meta["ds.tokenizer"]  # stored compact: it is a visible share of a small int4 file
    assert (out / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    prov = json.loads(meta["ds.provenance"])
    assert prov["export"]["command"] == "ds-quant export ..." and "packages" in prov
    om = OnnxModel(out)
    assert om.tokenizer is not None and om.config.d_model == 64


def test_quant_export_external_data(tmp_path, make_tiny):
    model = make_tiny()
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        ref = model(x).numpy()
    meta = {"ds.config": json.dumps(model.config.to_dict())}
    export_onnx(model, tmp_path, metadata=meta, external_data=True)
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"
    }
    assert (tmp_path / "model.onnx").stat().st_size < 100_000 < (tmp_path / "model.onnx.data").stat().st_size
    got = OnnxModel(tmp_path).logits(x.numpy())
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize(("mode", "bits"), [("static", 32), ("static", 4), ("dynamic", 32), ("dynamic", 4)])
def test_quant_export_sparse_mlp(tmp_path, make_tiny, mode, bits):
    import ds_core

    model = make_tiny(scale=2.0, sparse_ratio=0.5, sparsity_mode=mode)
    if mode == "dynamic":
        with pytest.raises(DsQuantError, match="not calibrated"):
            export_onnx(copy.deepcopy(model), tmp_path)
        with ds_core.calibration(model), torch.no_grad():
            model(torch.randint(0, 512, (4, 32)))
    dense = copy.deepcopy(model)
    for layer in dense.layers:  # the same weights without sparsity: the export must not be this
        layer.mlp.sparsity = ds_core.SparsityConfig()
    if bits == 4:
        model, dense = quantize(model, 4, 32), quantize(dense, 4, 32)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad(), set_backend("reference"):
        ref, ref_dense = model(x).numpy(), dense(x).numpy()
    export_onnx(model, tmp_path, metadata={"ds.config": json.dumps(model.config.to_dict())}, accuracy_level=0)
    got = OnnxModel(tmp_path).logits(x.numpy())
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() / scale < 1e-4
    assert np.abs(ref_dense - ref).max() / scale > 1e-2  # sparsity really changed the function
    if mode == "static" and bits == 32:  # float static: only the kept neurons' weights are stored
        proto = onnx.load(str(tmp_path / "model.onnx"))
        gate_up = next(t for t in proto.graph.initializer if t.name.endswith("mlp.gate_up.stored"))
        assert list(gate_up.dims) == [160, 64]  # 2 x (160 - 80 kept) rows of d_model 64


def test_quant_export_static_mlp_keeps_ds_cores_neuron_set(tmp_path, make_tiny):
    """From d_ff >= 1024 ds-core rounds the kept count up to a multiple of 64 (aligned GEMM tiles); the
    export must gather exactly ds-core's set, or fp32 parity breaks (it did, by 6e-3, on ds-small)."""
    model = make_tiny(scale=2.0, sparse_ratio=0.3, sparsity_mode="static", d_ff=1024)
    kept = model.layers[0].mlp.static_keep_indices()
    assert kept.numel() == 768  # 1024 - round(307.2) = 717, rounded up to 12 x 64
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad(), set_backend("reference"):
        ref = model(x).numpy()
    export_onnx(model, tmp_path, metadata={"ds.config": json.dumps(model.config.to_dict())}, accuracy_level=0)
    got = OnnxModel(tmp_path).logits(x.numpy())
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    proto = onnx.load(str(tmp_path / "model.onnx"))
    gate_up = next(t for t in proto.graph.initializer if t.name.endswith("mlp.gate_up.stored"))
    assert list(gate_up.dims) == [2 * 768, 64]
