"""DynamicSparseLinear and the sparse_linear functional: nn.Linear equivalence at ratio 0, every
dispatch path (Triton row-gather / masked dense, CPU gather, reference) against the reference,
static packing and its straight-through estimator, calibration shared with SparseMLP, state
dicts, LoRA wrapping and input errors."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_core
from ds_core import DsCoreError, DynamicSparseLinear, SparsityConfig, SparsityConfigError, sparse_linear
from ds_core.kernels import cpu_mlp, reference

SL = importlib.import_module("ds_core.sparse_linear")  # the module (ds_core.sparse_linear is the function)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run (interpreter on CPU)
D_IN, D_OUT = 48, 40  # not multiples of the kernels' block sizes: partial tiles everywhere


def make(ratio=0.5, mode="dynamic", bias=True, dtype=torch.float32, seed=0, d_in=D_IN, d_out=D_OUT, **kw):
    torch.manual_seed(seed)
    cfg = SparsityConfig(sparse_ratio=ratio, mode=mode, **kw)
    return DynamicSparseLinear(d_in, d_out, bias=bias, sparsity=cfg).to(dtype).eval()


def expected(m: DynamicSparseLinear, x: torch.Tensor, t) -> torch.Tensor:
    """sparsify then linear, in float64 (the same mask as the layer: sparsify runs in x's dtype)."""
    xs = reference.sparsify(x, t).double()
    b = None if m.bias is None else m.bias.double()
    return F.linear(xs, m.weight.double(), b)


def spy(monkeypatch, module, name):
    """Count the calls of a real function (it still runs)."""
    calls = []
    real = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


# ------------------------------------------------------------------------------ dense layer
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("bias", [False, True])
def test_ratio_zero_is_exactly_nn_linear(mode, bias):
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT, bias=bias)
    torch.manual_seed(0)
    m = DynamicSparseLinear(D_IN, D_OUT, bias=bias, sparsity=SparsityConfig(sparse_ratio=0.0, mode=mode))
    assert isinstance(m, nn.Linear) and type(m) is not nn.Linear
    assert list(m.state_dict()) == list(lin.state_dict()) and m.sparse_state_keys() == []
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), lin.state_dict().values()))
    x = torch.randn(3, 5, D_IN)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(m(x), lin(x))


# ----------------------------------------------------------------------------- dynamic mode
@pytest.mark.parametrize("n_tok", [1, 2, 16, 17])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", ["gather", "masked"])
def test_dynamic_cpu_paths_match_the_reference(monkeypatch, n_tok, bias, path):
    m = make(ratio=0.5, bias=bias)
    m.calibrate(torch.randn(256, D_IN))
    # the CPU gather path runs while tokens * (1 - ratio) <= the limit; move the limit to force each
    limit = 1e9 if path == "gather" else 0.0
    monkeypatch.setattr(SL, "CPU_GATHER_MAX_ROWS_READ", limit)
    calls = spy(monkeypatch, cpu_mlp, "gather_matmul")
    x = torch.randn(n_tok, D_IN)
    with torch.no_grad():
        got = m(x, backend="torch")
    assert len(calls) == (1 if path == "gather" else 0)
    torch.testing.assert_close(got.double(), expected(m, x, m.act_threshold), rtol=1e-5, atol=1e-5)
    if path == "gather" and n_tok <= 2:  # the weight columns of skipped inputs are never read
        skipped = ~(x.abs() > m.act_threshold).any(0)
        assert skipped.any()
        with torch.no_grad():
            m.weight[:, skipped] = float("nan")
            assert torch.isfinite(m(x, backend="torch")).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tok", [1, 2, 16, 17])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fused_cast", [False, True])
def test_dynamic_triton_matches_the_reference(needs_triton, monkeypatch, dtype, n_tok, bias, fused_cast):
    from ds_core.kernels import triton_mlp

    monkeypatch.setattr(SL, "FUSED_CAST", fused_cast)  # bias + cast after the GEMV, or inside it
    monkeypatch.setattr(SL, "LINEAR_BATCHED_MAX_UNION", 1.0)
    device = DEVICE
    # union 1.0: the row-gather kernel takes every batch up to 16 tokens; 17 takes the masked GEMM
    m = make(ratio=0.5, bias=bias, dense_fallback_union=1.0).to(device=device, dtype=dtype)
    m.calibrate(torch.randn(256, D_IN, device=device, dtype=dtype))
    gather = spy(monkeypatch, triton_mlp, "_gemv")
    masked = spy(monkeypatch, triton_mlp, "sparsify")
    x = torch.randn(n_tok, D_IN, device=device, dtype=dtype)
    with torch.no_grad():
        got = m(x, backend="triton")
    assert (len(gather), len(masked)) == ((1, 0) if n_tok <= 16 else (0, 1))
    assert got.dtype == dtype and got.shape == (n_tok, D_OUT)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), expected(m, x, m.act_threshold), rtol=tol, atol=tol)


def test_triton_auto_falls_back_to_the_masked_gemm_when_the_union_is_nearly_everything(
    needs_triton, monkeypatch
):
    from ds_core.kernels import triton_mlp

    # batch 1 gathers while 1 - ratio <= dense_fallback_union (0.95), 2..16 tokens while the union
    # 1 - ratio^B is also <= LINEAR_BATCHED_MAX_UNION (0.75 here)
    monkeypatch.setattr(SL, "LINEAR_BATCHED_MAX_UNION", 0.75)
    for ratio, n_tok, gathers in (
        (0.1, 1, True),
        (0.02, 1, False),
        (0.5, 2, True),
        (0.5, 3, False),
        (0.5, 16, False),
    ):
        m = make(ratio=ratio).to(DEVICE)
        m.calibrate(torch.randn(256, D_IN, device=DEVICE))
        gather = spy(monkeypatch, triton_mlp, "_gemv")
        x = torch.randn(n_tok, D_IN, device=DEVICE)
        with torch.no_grad():
            got = m(x, backend="triton")
        assert len(gather) == int(gathers), (ratio, n_tok)
        torch.testing.assert_close(got.double(), expected(m, x, m.act_threshold), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uncalibrated_keeps_each_tokens_top_magnitudes(request, backend):
    device = "cpu"
    if backend == "triton":
        request.getfixturevalue("needs_triton")
        device = DEVICE
    m = make(ratio=0.25, d_in=64).to(device)
    assert not m.calibrated and torch.isnan(m.act_threshold).all()
    x = torch.randn(2, 3, 64, device=device)
    with torch.no_grad():
        got = m(x, backend=backend)
    keep = x.abs() > reference.topk_threshold(x, 0.25)
    assert (keep.sum(-1) == 48).all()  # exactly 64 - round(0.25 * 64) per token
    ref = F.linear((x * keep).double(), m.weight.double(), m.bias.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_dynamic_training_runs_the_reference_and_gradients_skip_dropped_inputs():
    m = make(ratio=0.5).train()
    m.calibrate(torch.randn(256, D_IN))
    x = torch.randn(4, D_IN, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y.double(), expected(m, x.detach(), m.act_threshold), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    skipped = x.abs() <= m.act_threshold
    assert skipped.any() and (x.grad[skipped] == 0).all() and (x.grad[~skipped] != 0).all()
    assert m.weight.grad is not None and m.bias.grad is not None
    assert (m.weight.grad[:, skipped.all(0)] == 0).all()  # columns no token used get no gradient


def test_empty_batches_pass_through():
    m = make()
    m.calibrate(torch.randn(64, D_IN))
    with torch.no_grad():
        assert m(torch.randn(0, D_IN)).shape == (0, D_OUT)


# ------------------------------------------------------------------------------ static mode
def test_static_packed_inference_equals_the_masked_training_forward():
    m = make(ratio=0.3, mode="static", d_in=100)
    with torch.no_grad():
        m.feature_score.copy_(torch.randn(100))
    keep = m.static_keep_indices()
    assert keep.numel() == 70 and set(keep.tolist()) == set(m.feature_score.topk(70).indices.tolist())
    x = torch.randn(4, 6, 100)
    masked = m(x)  # grad enabled: the straight-through forward
    with torch.no_grad():
        packed = m(x)  # cached W[:, keep] on x[..., keep]
    mask = torch.zeros(100)
    mask[keep] = 1
    torch.testing.assert_close(masked, F.linear(x * mask, m.weight, m.bias), rtol=0, atol=0)
    torch.testing.assert_close(packed, masked, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # dropped features really take no part, at any batch size
        m.weight[:, mask == 0] = float("nan")
        torch.testing.assert_close(m(torch.cat([x, x])), torch.cat([packed, packed]), rtol=1e-5, atol=1e-5)


def test_static_gradients_reach_weight_and_score_through_the_straight_through_estimator():
    m = make(ratio=0.5, mode="static").double().train()
    x = torch.randn(8, D_IN, dtype=torch.float64)
    m(x).square().sum().backward()
    keep = m.static_keep_indices()
    dropped = torch.ones(D_IN, dtype=torch.bool)
    dropped[keep] = False
    assert (m.feature_score.grad != 0).all()  # every score moves, kept or not
    assert (m.weight.grad[:, keep] != 0).all() and (m.weight.grad[:, dropped] == 0).all()
    # the score's gradient is the mask's gradient times d sigmoid: check it against autograd of
    # the same function written out with a soft mask whose value is the hard one
    s = torch.sigmoid(m.feature_score.detach())
    grad_mask = ((2 * m(x).detach()) @ m.weight.detach() * x).sum(0)
    torch.testing.assert_close(m.feature_score.grad, grad_mask * s * (1 - s))


def test_static_cache_follows_the_score():
    m = make(ratio=0.5, mode="static")
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        before = m(x)
        m.feature_score.neg_()  # the kept set flips
        after = m(x)
    keep = m.static_keep_indices()
    mask = torch.zeros(D_IN)
    mask[keep] = 1
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, F.linear(x * mask, m.weight, m.bias), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ calibration
def test_calibration_skips_the_target_share_of_calibration_activations():
    m = make(ratio=0.4, d_in=64)
    data = torch.randn(512, 64) * torch.linspace(0.5, 2.0, 64)
    assert m.calibrate(data.split(128)) is m and m.calibrated
    skipped = (data.abs() <= m.act_threshold).float().mean().item()
    assert abs(skipped - 0.4) < 0.005


def test_one_calibration_block_calibrates_sparse_mlps_and_linears_together():
    torch.manual_seed(0)
    cfg = SparsityConfig(sparse_ratio=0.5)
    model = nn.Sequential(
        ds_core.SparseMLP(32, 64, cfg),
        DynamicSparseLinear(32, 24, sparsity=cfg),
        nn.Linear(24, 24),  # plain Linears are left alone
        DynamicSparseLinear(24, 8, bias=False, sparsity=SparsityConfig(sparse_ratio=0.3)),
    ).eval()
    mlp, l1, lin, l3 = model
    x = torch.randn(256, 32)
    with ds_core.calibration(model), torch.no_grad():
        out = model(x)
    assert mlp.calibrated and l1.calibrated and l3.calibrated
    with torch.no_grad():  # the calibration forward was dense; these are the inputs each layer saw
        h1 = reference.swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        h3 = lin(F.linear(h1, l1.weight, l1.bias))
        torch.testing.assert_close(out, F.linear(h3, l3.weight))
    assert abs((h1.abs() <= l1.act_threshold).float().mean().item() - 0.5) < 0.01
    assert abs((h3.abs() <= l3.act_threshold).float().mean().item() - 0.3) < 0.01
    assert abs((x.abs() <= mlp.act_threshold[0]).float().mean().item() - 0.5) < 0.01


def test_calibration_errors_name_what_is_wrong():
    with pytest.raises(DsCoreError, match="holds no SparseMLP or DynamicSparseLinear"):
        ds_core.calibration(nn.Sequential(make(ratio=0.0), make(mode="static")))
    m = make()
    with (
        pytest.raises(DsCoreError, match="no forward pass reached a DynamicSparseLinear"),
        ds_core.calibration(nn.Sequential(m)),
    ):
        pass
    assert not m.calibrated


# ------------------------------------------------------------------------------ state dicts
def test_state_dict_round_trip_and_plain_linear_checkpoints():
    m = make(ratio=0.5)
    m.calibrate(torch.randn(128, D_IN))
    sd = m.state_dict()
    assert list(sd) == ["weight", "bias", "act_threshold"] and m.sparse_state_keys() == ["act_threshold"]
    m2 = make(ratio=0.5, seed=1)
    m2.load_state_dict(sd, strict=True)
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        assert torch.equal(m2(x), m(x)) and m2.calibrated
    # a plain nn.Linear (HF) state dict loads strictly; the sparse state is filled in
    lin = nn.Linear(D_IN, D_OUT)
    m3 = make(ratio=0.5, seed=2)
    m3.load_state_dict(lin.state_dict(), strict=True)
    assert torch.equal(m3.weight, lin.weight) and not m3.calibrated
    s = make(ratio=0.5, mode="static", seed=3)
    s.load_state_dict(lin.state_dict(), strict=True)
    torch.testing.assert_close(s.feature_score, DynamicSparseLinear._score_from_weight(lin.weight))
    # a checkpoint of the other mode: its sparse state is dropped
    s.load_state_dict(sd, strict=True)
    assert list(s.state_dict()) == ["weight", "bias", "feature_score"]


def test_from_linear_shares_the_parameters():
    lin = nn.Linear(D_IN, D_OUT)
    m = DynamicSparseLinear.from_linear(lin, SparsityConfig(sparse_ratio=0.5))
    assert m.weight is lin.weight and m.bias is lin.bias and not m.calibrated
    assert m.act_threshold.device == lin.weight.device


# ----------------------------------------------------------------------- the functional / LoRA
def test_functional_fuses_projections_that_share_an_input():
    qkv = [make(ratio=0.5, seed=s, d_out=n) for s, n in enumerate((40, 16, 16))]
    data = torch.randn(128, D_IN)
    qkv[0].calibrate(data)
    for m in qkv[1:]:
        m.load_state_dict({"act_threshold": qkv[0].act_threshold}, strict=False)
    wt = torch.cat([m.transposed_weight() for m in qkv], dim=1)  # (in, 72)
    assert wt.shape == (D_IN, 72) and qkv[0].transposed_weight() is qkv[0].transposed_weight()
    b = torch.cat([m.bias for m in qkv]).detach()
    x = torch.randn(2, 1, D_IN)
    with torch.no_grad():
        fused = sparse_linear(x, wt, qkv[0].act_threshold, b, ratio=0.5, backend="torch")
        separate = torch.cat([m(x, backend="torch") for m in qkv], dim=-1)
    assert fused.shape == (2, 1, 72)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    # per-token thresholds, a Python float, and gradients through the functional
    t = reference.topk_threshold(x, 0.5)
    torch.testing.assert_close(
        sparse_linear(x, wt, t, ratio=0.5), F.linear(reference.sparsify(x, t), wt.t()), rtol=1e-5, atol=1e-5
    )
    wt_g = wt.clone().requires_grad_()
    sparse_linear(x, wt_g, 0.5).sum().backward()
    assert (wt_g.grad[(x.abs() <= 0.5).all(0).all(0)] == 0).all() and wt_g.grad.abs().sum() > 0


def test_peft_lora_wraps_it_like_a_linear():
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module("proj", make(ratio=0.5))
    model.proj.calibrate(torch.randn(64, D_IN))
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        before = model(x)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["proj"]), model)
    assert type(model.proj).__name__ == "Linear" and model.proj.base_layer.__class__ is DynamicSparseLinear
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # LoRA's B starts at zero
    model(x).sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------------------------ errors
def test_bad_input_errors_name_the_argument():
    m = make()
    with pytest.raises(DsCoreError, match=r"x: expected shape \(\.\.\., 48\)"):
        m(torch.randn(2, 47))
    with pytest.raises(DsCoreError, match="x: expected a floating-point tensor"):
        m(torch.ones(2, D_IN, dtype=torch.long))
    with pytest.raises(DsCoreError, match=r"x: dtype torch\.float64 differs"):
        m(torch.randn(2, D_IN, dtype=torch.float64))
    with pytest.raises(DsCoreError, match="x: on meta but the weight is on cpu"):
        m(torch.empty(2, D_IN, device="meta"))
    with pytest.raises(SparsityConfigError, match="sparse_ratio"):
        make(ratio=1.0)
    with pytest.raises(DsCoreError, match="sparsity: expected a SparsityConfig"):
        DynamicSparseLinear(4, 4, sparsity=0.5)
    with pytest.raises(DsCoreError, match="in_features: expected a positive integer"):
        DynamicSparseLinear(0, 4)
    with pytest.raises(DsCoreError, match="backend: expected one of"):
        m.calibrate(torch.randn(8, D_IN))
        m(torch.randn(1, D_IN), backend="cuda")
    x, wt = torch.randn(2, D_IN), torch.randn(D_IN, 8)
    with pytest.raises(DsCoreError, match="sparse_linear: weight_t: expected a 2-D tensor"):
        sparse_linear(x, wt[0], 0.1)
    with pytest.raises(DsCoreError, match=r"sparse_linear: x: expected shape \(\.\.\., 47\)"):
        sparse_linear(x, wt[:47].contiguous(), 0.1)
    with pytest.raises(DsCoreError, match="weight_t: expected a contiguous"):
        sparse_linear(x, torch.randn(8, D_IN).t(), 0.1)
    with pytest.raises(DsCoreError, match=r"weight_t: dtype torch\.float16"):
        sparse_linear(x, wt.half(), 0.1)
    with pytest.raises(DsCoreError, match=r"bias: expected shape \(8,\)"):
        sparse_linear(x, wt, 0.1, torch.randn(9))
    with pytest.raises(DsCoreError, match="threshold: expected one value or one per token"):
        sparse_linear(x, wt, torch.ones(3))
    with pytest.raises(DsCoreError, match=r"ratio: expected a number in \[0, 1\)"):
        sparse_linear(x, wt, 0.1, ratio=1.0)


# --------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_tok", [1, 4, 16, 64])
def test_bf16_on_the_gpu_and_in_a_cuda_graph(n_tok, rel_err):
    m = make(ratio=0.5, d_in=4096, d_out=1536).to("cuda", torch.bfloat16)
    m.calibrate(torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(n_tok, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
        assert rel_err(eager, expected(m, x, m.act_threshold)) < 1e-2
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            m(x)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # no host sync per call once the threshold is cached
            out = m(x)
        first = out.clone()
        x.copy_(torch.randn_like(x))
        g.replay()
        # the split-K partial sums meet by float32 atomics: equal up to their order, not bitwise
        assert not torch.equal(out, first) and rel_err(out, m(x)) < 2e-3
