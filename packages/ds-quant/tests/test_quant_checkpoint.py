"""Quantized model directories: the module swap, quant.yaml, the round trip and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from ds_quant import (
    DsQuantError,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    load_quantized,
    quantize,
    save_quantized,
    set_backend,
)
from ds_quant.quantize import plan_precision


@pytest.mark.parametrize(
    ("tie", "bits", "sym", "overrides"),
    [
        (True, 4, True, {}),
        (True, 4, False, {"layers.1.mlp.*": 8, "layers.0.self_attn.o_proj": "float"}),
        (False, 8, True, {"embed_tokens": "float"}),
        (False, 4, False, {"lm_head": 8}),
        (True, 8, False, {"lm_head": "float"}),
    ],
)
def test_quant_round_trip(tmp_path, make_tiny, tie, bits, sym, overrides):
    model = make_tiny(scale=1.0, tie_embeddings=tie)
    x = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        ref = model(x)
    q = quantize(model, bits, 32, sym=sym, overrides=overrides)
    with torch.no_grad(), set_backend("reference"):
        y = q(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 0 < rel < (0.3 if bits == 4 else 0.03), rel  # quantized: close to float, but not equal

    save_quantized(q, tmp_path / "q")
    meta = yaml.safe_load((tmp_path / "q" / "quant.yaml").read_text())
    assert meta["format"] == "onnxruntime.MatMulNBits" and meta["bits"] == bits and meta["sym"] == sym
    assert meta["group_size"] == 32 and meta["method"] == "rtn" and meta["tied_embeddings"] == tie
    assert meta["layers"]["layers.1.mlp.gate_proj"] == overrides.get("layers.1.mlp.*", bits)
    for pattern, v in overrides.items():
        if "*" not in pattern:
            assert meta["layers"][pattern] == v
            if tie and pattern in ("lm_head", "embed_tokens"):  # a tied pair shares one precision
                assert meta["layers"]["embed_tokens"] == meta["layers"]["lm_head"] == v

    loaded = load_quantized(tmp_path / "q")
    assert {k: v for k, v in loaded.state_dict().items()}.keys() == q.state_dict().keys()
    for k, v in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad(), set_backend("reference"):
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    if tie and isinstance(loaded.lm_head, QuantLinear):
        assert loaded.embed_tokens.tied and loaded.embed_tokens.source is loaded.lm_head
    if tie and isinstance(loaded.lm_head, nn.Linear):
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_quant_swaps_modules_and_stores_packed_bytes_once(tmp_path, make_tiny):
    q = quantize(make_tiny(), 4, 32)
    assert isinstance(q.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(q.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(q.embed_tokens, QuantEmbedding) and q.embed_tokens.tied
    save_quantized(q, tmp_path / "q")
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert stored["lm_head.qweight"].dtype == torch.uint8
    assert stored["lm_head.qweight"].shape == (512, 2, 16)  # (N, n_blocks, blob): MatMulNBits' B
    assert not any(k.startswith("embed_tokens") for k in stored)  # the tied table is lm_head's
    assert "layers.0.self_attn.q_proj.bias" in stored  # ds-tiny has qkv bias


def test_quant_plan_rules(make_tiny):
    model = make_tiny()
    plan = plan_precision(
        model, QuantConfig(bits=4, overrides={"layers.*.mlp.*": 8, "embed_tokens": "float"})
    )
    assert plan["layers.0.mlp.up_proj"] == 8 and plan["layers.0.self_attn.q_proj"] == 4
    assert plan["embed_tokens"] is None and plan["lm_head"] is None  # tied: follows the override
    with pytest.raises(DsQuantError, match="matches no module"):
        plan_precision(model, QuantConfig(overrides={"lm_haed": 8}))
    with pytest.raises(DsQuantError, match="tied"):
        plan_precision(model, QuantConfig(overrides={"lm_head": 8, "embed_tokens": 4}))
    with pytest.raises(DsQuantError, match=r"overrides.lm_head"):
        QuantConfig(overrides={"lm_head": 3})


def test_quant_refuses_already_quantized(make_tiny):
    q = quantize(make_tiny(), 4, 32)
    with pytest.raises(DsQuantError, match="already quantized"):
        quantize(q, 4, 32)


def test_quant_load_errors_name_the_file(tmp_path, make_tiny):
    q = quantize(make_tiny(), 4, 32)
    save_quantized(q, tmp_path / "q")
    with pytest.raises(DsQuantError, match="already exists"):
        save_quantized(q, tmp_path / "q")
    save_quantized(q, tmp_path / "q", force=True)  # replacing is explicit

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "quant.yaml"):
        (broken / name).write_bytes((tmp_path / "q" / name).read_bytes())
    with pytest.raises(DsQuantError, match=r"model.safetensors: missing"):
        load_quantized(broken)
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "lm_head.scales"}, str(broken / "model.safetensors"))
    with pytest.raises(DsQuantError, match=r"lm_head.scales: missing"):
        load_quantized(broken)
    state["layers.0.self_attn.q_proj.qweight"] = state["layers.0.self_attn.q_proj.qweight"][
        :, :1
    ].contiguous()
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(DsQuantError, match="does not match"):
        load_quantized(broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DsQuantError, match="corrupt"):
        load_quantized(broken)
    meta = yaml.safe_load((broken / "quant.yaml").read_text())
    meta["group_size"] = 48
    (broken / "quant.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DsQuantError, match=r"quant.yaml: group_size"):
        load_quantized(broken)


def test_quant_model_generates_with_ds_models(make_tiny):
    from ds_models import generate

    model = make_tiny()
    q = quantize(copy.deepcopy(model), 8, 32)
    with set_backend("cached"):
        out = generate(q, [[1, 2, 3], [4]], max_new_tokens=5)
    assert [len(o) for o in out] == [5, 5]
