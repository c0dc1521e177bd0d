"""SparseMLP on the torch backend: dense equivalence, both modes against the reference, training
through the straight-through estimator, calibration, state-dict compatibility, input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_core
from ds_core import DsCoreError, SparseMLP, SparsityConfig
from ds_core.kernels import cpu_mlp, reference


def weights(m: SparseMLP):
    return m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


def biases(m: SparseMLP):
    return m.gate_proj.bias, m.up_proj.bias, m.down_proj.bias


# ------------------------------------------------------------------------------ dense layer
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("bias", [False, True])
def test_ratio_zero_is_exactly_the_dense_swiglu(make_mlp, mode, bias):
    m = make_mlp(ratio=0.0, mode=mode, bias=bias)
    x = torch.randn(2, 5, 32)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(m(x), reference.swiglu(x, *weights(m), *biases(m)))
    names = ["gate_proj", "up_proj", "down_proj"]
    expected = [f"{n}.{p}" for n in names for p in (["weight", "bias"] if bias else ["weight"])]
    assert m.sparse_state_keys() == [] and list(m.state_dict()) == expected


def test_matches_hf_llama_mlp_with_the_same_state_dict():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    hf = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=96, hidden_act="silu", mlp_bias=False))
    ours = SparseMLP(32, 96)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=0)
    # a sparse module loads the same HF state dict (its sparse state is filled in)
    for mode in ("static", "dynamic"):
        SparseMLP(32, 96, SparsityConfig(sparse_ratio=0.3, mode=mode)).load_state_dict(hf.state_dict())


# ------------------------------------------------------------------------------- static mode
def test_static_keeps_the_top_scoring_neurons_for_every_token(make_mlp):
    m = make_mlp(d_ff=100, ratio=0.3, mode="static")
    with torch.no_grad():
        m.neuron_score.copy_(torch.randn(100))
    keep = reference.static_keep(m.neuron_score, 0.3)
    assert keep.numel() == 70
    assert set(keep.tolist()) == set(m.neuron_score.topk(70).indices.tolist())
    x = torch.randn(4, 6, 32)
    ref = reference.static_sparse_swiglu(x, *weights(m), keep)
    train_out = m(x)  # masked path (grad enabled)
    with torch.no_grad():
        packed_out = m(x)  # packed smaller weights
    assert train_out.shape == x.shape
    torch.testing.assert_close(train_out, ref, rtol=0, atol=0)
    torch.testing.assert_close(packed_out, ref, rtol=1e-5, atol=1e-6)
    dropped = torch.ones(100, dtype=torch.bool)
    dropped[keep] = False
    # dropped neurons really contribute nothing: perturbing their down-projection columns changes nothing
    with torch.no_grad():
        m.down_proj.weight[:, dropped] += 100.0
        torch.testing.assert_close(m(x), packed_out, rtol=1e-5, atol=1e-6)


def test_static_gradients_reach_the_score_through_the_straight_through_estimator(make_mlp):
    m = make_mlp(d_ff=48, ratio=0.5, mode="static").double().train()
    x = torch.randn(5, 32, dtype=torch.float64)
    gy = torch.randn(5, 32, dtype=torch.float64)
    (m(x) * gy).sum().backward()
    # dL/d score_j = sum_tokens dL/dh'_j * h_j * sigmoid'(score_j), with h the unmasked activation
    h = F.silu(m.gate_proj(x)) * m.up_proj(x)
    dl_dhm = gy @ m.down_proj.weight  # (5, d_ff): gradient w.r.t. the masked hidden activations
    s = torch.sigmoid(m.neuron_score)
    expected = (dl_dhm * h).sum(0) * s * (1 - s)
    torch.testing.assert_close(m.neuron_score.grad, expected.detach())
    assert (m.neuron_score.grad.abs() > 0).sum() == 48  # dropped neurons get a gradient too
    # the weights of dropped neurons get none: their contribution is masked out of the forward
    keep = reference.static_keep(m.neuron_score, 0.5)
    dropped = torch.ones(48, dtype=torch.bool)
    dropped[keep] = False
    assert torch.all(m.gate_proj.weight.grad[dropped] == 0)
    assert torch.all(m.gate_proj.weight.grad[keep].abs().sum(1) > 0)


def test_static_gradcheck_of_the_masked_forward(make_mlp):
    m = make_mlp(d_model=8, d_ff=12, ratio=0.25, mode="static", bias=True).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: m(inp), (x,))


def test_static_training_moves_the_kept_set_and_refreshes_the_packed_cache(make_mlp):
    m = make_mlp(d_ff=40, ratio=0.5, mode="static")
    x = torch.randn(8, 32)
    with torch.no_grad():
        before = m(x)
    keep0 = reference.static_keep(m.neuron_score, 0.5)
    with torch.no_grad():  # as an optimizer step would: in place
        m.neuron_score[keep0] -= 100.0
    keep1 = reference.static_keep(m.neuron_score, 0.5)
    assert set(keep0.tolist()).isdisjoint(keep1.tolist())
    with torch.no_grad():
        after = m(x)
    torch.testing.assert_close(
        after, reference.static_sparse_swiglu(x, *weights(m), keep1), rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(before, after)
    with torch.no_grad():
        m.up_proj.weight.mul_(2.0)
        torch.testing.assert_close(
            m(x), reference.static_sparse_swiglu(x, *weights(m), keep1), rtol=1e-5, atol=1e-6
        )
    m.train()
    assert m._cache == {}


def test_static_score_is_initialised_from_weight_magnitudes_when_a_checkpoint_lacks_it(make_mlp):
    dense = make_mlp(ratio=0.0, d_ff=64)
    sd = dense.state_dict()
    big = torch.arange(64) % 4 == 0  # make every 4th neuron clearly the most important
    sd["down_proj.weight"][:, big] *= 10
    m = make_mlp(ratio=0.75, d_ff=64, mode="static", seed=1)
    m.load_state_dict(sd)  # strict: the missing neuron_score is filled in
    assert set(reference.static_keep(m.neuron_score, 0.75).tolist()) == set(big.nonzero().flatten().tolist())


def test_sparse_state_of_another_mode_is_dropped_on_load(make_mlp):
    static = make_mlp(ratio=0.3, mode="static")
    dynamic = make_mlp(ratio=0.3, mode="dynamic")
    dynamic.load_state_dict(static.state_dict())  # neuron_score is not a dynamic-mode key
    static.load_state_dict(dynamic.state_dict())  # act_threshold is not a static-mode key
    assert static.sparse_state_keys() == ["neuron_score"] and dynamic.sparse_state_keys() == ["act_threshold"]
    make_mlp(ratio=0.0).load_state_dict(static.state_dict())


# ------------------------------------------------------------------------------ dynamic mode
def test_uncalibrated_dynamic_keeps_each_tokens_top_magnitudes(make_mlp):
    ratio = 0.75
    m = make_mlp(d_model=32, d_ff=96, ratio=ratio)
    assert not m.calibrated
    x = torch.randn(3, 4, 32)
    t_in = reference.topk_threshold(x, ratio)
    assert torch.all((x.abs() > t_in).sum(-1) == 32 - 24)  # exactly round(0.75 * 32) skipped per token
    xs = reference.sparsify(x, t_in)
    h = F.silu(m.gate_proj(xs)) * m.up_proj(xs)
    ref = m.down_proj(reference.sparsify(h, reference.topk_threshold(h, ratio)))
    torch.testing.assert_close(m(x), ref)  # training path (grad enabled)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)  # masked-dense inference
        torch.testing.assert_close(m(x[:1, :1]), ref[:1, :1], rtol=1e-5, atol=1e-6)  # CPU gather path


def test_empty_batches_pass_through(make_mlp):
    for mode in ("static", "dynamic"):
        m = make_mlp(ratio=0.5, mode=mode)
        with torch.no_grad():
            assert m(torch.randn(0, 7, 32)).shape == (0, 7, 32)


def test_calibration_sets_thresholds_that_skip_the_target_share(make_mlp):
    m = make_mlp(d_model=64, d_ff=160, ratio=0.6)
    data = torch.randn(400, 64)
    m.calibrate(data.split(100))
    assert m.calibrated
    t_in, t_h = m.act_threshold
    assert abs((data.abs() <= t_in).float().mean().item() - 0.6) < 0.01
    with torch.no_grad():
        h = F.silu(m.gate_proj(data)) * m.up_proj(data)
    assert abs((h.abs() <= t_h).float().mean().item() - 0.6) < 0.01
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            m(x), reference.dynamic_sparse_swiglu(x, *weights(m), t_in, t_h), rtol=1e-5, atol=1e-6
        )
    # thresholds travel with the state dict
    other = make_mlp(d_model=64, d_ff=160, ratio=0.6, seed=3)
    other.load_state_dict(m.state_dict())
    assert other.calibrated and torch.equal(other.act_threshold, m.act_threshold)


def test_calibration_context_covers_every_dynamic_mlp_of_a_model(make_mlp):
    model = torch.nn.Sequential(make_mlp(ratio=0.5), make_mlp(ratio=0.5, seed=1), make_mlp(ratio=0.0))
    with ds_core.calibration(model), torch.no_grad():
        model(torch.randn(64, 32))
    assert model[0].calibrated and model[1].calibrated
    assert not torch.equal(model[0].act_threshold, model[1].act_threshold)
    with pytest.raises(DsCoreError, match="no forward pass"), ds_core.calibration(model):
        pass
    with pytest.raises(DsCoreError, match="holds no SparseMLP"):
        ds_core.calibration(torch.nn.Sequential(make_mlp(ratio=0.5, mode="static")))


def test_dynamic_training_gradients_skip_the_dropped_inputs(make_mlp):
    m = make_mlp(ratio=0.5).train()
    m.calibrate(torch.randn(64, 32))
    x = torch.randn(4, 32, requires_grad=True)
    m(x).sum().backward()
    skipped = x.detach().abs() <= m.act_threshold[0]
    assert skipped.any() and torch.all(x.grad[skipped] == 0)
    assert torch.all(x.grad[~skipped] != 0)


def test_the_dense_fallback_gives_the_sparse_result(make_mlp):
    m = make_mlp(ratio=0.7)
    m.calibrate(torch.randn(64, 32))
    x = torch.randn(1, 32)
    with torch.no_grad():
        gathered = m(x)  # batch 1 on the CPU: the gather path
        m.sparsity = SparsityConfig(sparse_ratio=0.7, dense_fallback_union=0.1)
        fallback = m(x.expand(3, 32))  # three tokens: dense GEMMs on the masked activations
    torch.testing.assert_close(fallback, gathered.expand(3, 32), rtol=1e-5, atol=1e-6)


def test_cpu_batch1_inference_never_reads_the_weights_of_skipped_inputs(make_mlp):
    m = make_mlp(d_model=32, d_ff=96, ratio=0.7)
    m.calibrate(torch.randn(64, 32))
    x = torch.randn(1, 32)
    t_in, t_h = m.act_threshold
    with torch.no_grad():
        expected = reference.dynamic_sparse_swiglu(x, *weights(m), t_in, t_h)
        skipped = x[0].abs() <= t_in
        assert skipped.any()
        m.gate_proj.weight[:, skipped] = float("nan")  # a dense read would spread these NaNs
        m.up_proj.weight[:, skipped] = float("nan")
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n_tok=st.integers(1, 3),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    ratio=st.floats(0.0, 0.95),
    per_token=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpu_gather_matmul_equals_the_reference(n_tok, d_in, d_out, ratio, per_token, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_tok, d_in, generator=g)
    wt = torch.randn(d_in, d_out, generator=g)
    t = reference.topk_threshold(a, ratio) if per_token else torch.tensor(ratio)
    torch.testing.assert_close(
        cpu_mlp.gather_matmul(a, wt, t), reference.sparse_gemv(a, wt, t), rtol=1e-5, atol=1e-5
    )


def test_cpu_gather_never_reads_the_rows_of_skipped_inputs():
    a = torch.tensor([[0.1, -2.0, 0.0, 3.0]])
    wt = torch.randn(4, 6)
    wt[[0, 2]] = float("nan")  # rows of inputs under the threshold: must never be touched
    out = cpu_mlp.gather_matmul(a, wt, torch.tensor(0.5))
    torch.testing.assert_close(out, -2.0 * wt[1:2] + 3.0 * wt[3:4])


# ----------------------------------------------------------------------------------- errors
def test_constructor_and_input_errors_name_the_argument(make_mlp):
    with pytest.raises(DsCoreError, match="d_ff: expected a positive integer"):
        SparseMLP(8, 0)
    with pytest.raises(DsCoreError, match="sparsity: expected a SparsityConfig"):
        SparseMLP(8, 16, {"sparse_ratio": 0.3})
    m = make_mlp(ratio=0.3)
    with pytest.raises(DsCoreError, match=r"x: expected shape \(\.\.\., 32\), got \(2, 31\)"):
        m(torch.randn(2, 31))
    with pytest.raises(DsCoreError, match="x: expected a floating-point tensor"):
        m(torch.ones(2, 32, dtype=torch.long))
    with pytest.raises(DsCoreError, match=r"x: dtype torch\.float64 differs"):
        m(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(DsCoreError, match="x: on meta but the weights are on cpu"):
        m(torch.randn(2, 32, device="meta"))
    with pytest.raises(DsCoreError, match="backend: expected one of"), torch.no_grad():
        m(torch.randn(1, 32), backend="cuda")
