"""GPTQ against round-to-nearest on the quantity it minimises, and on a whole model."""

from __future__ import annotations

import copy

import pytest
import torch

from ds_quant import (
    DsQuantError,
    GPTQConfig,
    QuantConfig,
    dequantize_weight,
    quantize,
    quantize_weight,
    set_backend,
)
from ds_quant.gptq import Hessian, gptq_weight


def _correlated_inputs(n_tokens: int, k: int, seed: int) -> torch.Tensor:
    """Activations that live near a low-dimensional subspace, as LLM activations do: GPTQ's case.
    (On independent inputs H is diagonal and GPTQ reduces to round-to-nearest.)"""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(k // 4, k, generator=gen)
    return torch.randn(n_tokens, k // 4, generator=gen) @ basis + 0.1 * torch.randn(
        n_tokens, k, generator=gen
    )


@pytest.mark.parametrize(("bits", "sym", "k"), [(4, True, 256), (4, False, 200), (8, True, 128)])
def test_quant_gptq_beats_rtn_on_layer_output_error(bits, sym, k):
    x = _correlated_inputs(2048, k, seed=k)
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(1)) * 0.05
    h = Hessian(k, torch.device("cpu"))
    for chunk in x.split(500):
        h.add(chunk)
    torch.testing.assert_close(h.h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    ref = x @ w.T

    def err(p):
        return ((x @ dequantize_weight(p).T - ref) ** 2).mean().item()

    rtn = quantize_weight(w, bits, 32, sym)
    gptq = gptq_weight(w, h.h, bits=bits, block_size=32, sym=sym)
    assert gptq.qweight.shape == rtn.qweight.shape and gptq.sym == sym
    assert err(gptq) < 0.5 * err(rtn), (err(gptq), err(rtn))


def test_quant_gptq_on_dead_inputs_is_exact_there():
    # Inputs that are always zero carry no information: their columns may take any value.
    x = _correlated_inputs(512, 64, seed=0)
    x[:, 10] = 0
    w = torch.randn(16, 64) * 0.05
    p = gptq_weight(w, 2 * x.T @ x / 512, bits=4, block_size=32, sym=True)
    assert torch.isfinite(dequantize_weight(p)).all()


def _model_and_tokens(make_tiny):
    """A tiny float model, calibration and held-out token batches, and its held-out logits."""
    model = make_tiny(scale=1.0)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 512, (16, 64), generator=gen)
    held_out = torch.randint(0, 512, (8, 64), generator=gen)
    with torch.no_grad():
        ref = model(held_out)
    return model, calib, held_out, ref


def test_quant_gptq_whole_model_closer_to_float_than_rtn(make_tiny):
    model, calib, held_out, ref = _model_and_tokens(make_tiny)
    cfg = dict(bits=4, group_size=32, sym=False, overrides={"lm_head": "float"})
    rtn = quantize(copy.deepcopy(model), config=QuantConfig(**cfg))
    seen = []
    gptq = quantize(copy.deepcopy(model), config=QuantConfig(**cfg, method="gptq", gptq=GPTQConfig(batch_size=4)),
                    calibration=calib, progress=seen.append)  # fmt: skip
    assert seen == ["layers.0", "layers.1"]
    with torch.no_grad(), set_backend("reference"):
        e_rtn = ((rtn(held_out) - ref) ** 2).mean()
        e_gptq = ((gptq(held_out) - ref) ** 2).mean()
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_quant_gptq_needs_calibration(make_tiny):
    with pytest.raises(DsQuantError, match="calibration"):
        quantize(make_tiny(), method="gptq")
    with pytest.raises(DsQuantError, match=r"gptq.damp"):
        QuantConfig(method="gptq", gptq={"damp": 2.0})


def test_quant_gptq_lm_head_reduces_logit_error(make_tiny):
    model = make_tiny(scale=1.0)
    calib = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(calib)
    cfg = dict(bits=4, group_size=32, method="gptq")
    head_gptq = quantize(copy.deepcopy(model), config=QuantConfig(**cfg), calibration=calib)
    head_rtn = quantize(
        copy.deepcopy(model), config=QuantConfig(**cfg, gptq={"lm_head": False}), calibration=calib
    )
    assert not torch.equal(head_gptq.lm_head.qweight, head_rtn.lm_head.qweight)
    assert head_gptq.embed_tokens.source is head_gptq.lm_head  # the tied table reads the GPTQ codes
    with torch.no_grad(), set_backend("reference"):
        e_gptq = ((head_gptq(calib) - ref) ** 2).mean()
        e_rtn = ((head_rtn(calib) - ref) ** 2).mean()
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize(
    "options", [{"act_order": True}, {"clip_search": True}, {"act_order": True, "clip_search": True}]
)
def test_quant_gptq_options_beat_rtn_and_stay_matmulnbits_data(options):
    k = 256
    x = _correlated_inputs(2048, k, seed=3)
    x[:, :16] *= 10  # a few loud inputs: act-order visits those columns first
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(1)) * 0.05
    h = 2 * x.T @ x / x.shape[0]
    ref = x @ w.T

    def err(p):
        return ((x @ dequantize_weight(p).T - ref) ** 2).mean().item()

    plain = gptq_weight(w, h, bits=4, block_size=32, sym=True)
    got = gptq_weight(w, h, bits=4, block_size=32, sym=True, **options)
    assert got.qweight.shape == plain.qweight.shape and got.scales.shape == plain.scales.shape
    assert not torch.equal(got.qweight, plain.qweight)  # the option changed the result
    assert err(got) < 0.5 * err(quantize_weight(w, 4, 32, True)), options
    if options.get("act_order"):
        # Static groups: each group's scale comes from the original weights, as round-to-nearest's.
        rtn_scales = quantize_weight(w, 4, 32, True, clip_search=options.get("clip_search", False)).scales
        torch.testing.assert_close(got.scales, rtn_scales)


@pytest.mark.parametrize("sym", [True, False])
def test_quant_clip_search_never_worse_per_group(sym):
    from ds_quant.packing import CLIP_NORM, dequantize_codes, group_params, quantize_codes

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 8, 32, generator=gen) * torch.rand(64, 8, 1, generator=gen)
    w[:, :, 0] *= 6  # an outlier per group: clipping it helps every other value

    def group_err(clip):
        s, z = group_params(w, 4, sym, clip_search=clip)
        deq = dequantize_codes(quantize_codes(w, s[..., None], z[..., None], 4), s[..., None], z[..., None])
        return (deq - w).abs().pow(CLIP_NORM).sum(-1)

    plain, clipped = group_err(False), group_err(True)
    assert (clipped <= plain + 1e-6).all()
    assert clipped.sum() < 0.97 * plain.sum()  # and strictly better overall


def test_quant_gptq_true_sequential_whole_model(make_tiny):
    model, calib, held_out, ref = _model_and_tokens(make_tiny)
    cfg = dict(bits=4, group_size=32, overrides={"lm_head": "float"})
    seq = GPTQConfig(batch_size=4, true_sequential=True, act_order=True, clip_search=True)
    rtn = quantize(copy.deepcopy(model), config=QuantConfig(**cfg))
    q = quantize(copy.deepcopy(model), config=QuantConfig(**cfg, method="gptq", gptq=seq), calibration=calib)
    plain = quantize(copy.deepcopy(model), config=QuantConfig(**cfg, method="gptq", gptq=GPTQConfig(batch_size=4)),
                     calibration=calib)  # fmt: skip
    assert not torch.equal(q.layers[1].mlp.down_proj.qweight, plain.layers[1].mlp.down_proj.qweight)
    with torch.no_grad(), set_backend("reference"):
        e_rtn = ((rtn(held_out) - ref) ** 2).mean()
        e_q = ((q(held_out) - ref) ** 2).mean()
    assert e_q < e_rtn, (e_q, e_rtn)
    with pytest.raises(DsQuantError, match=r"gptq.act_order: expected true or false"):
        GPTQConfig(act_order="yes")
