"""The Triton MLP kernels against the PyTorch reference.

On the CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): small shapes and
big blocks keep them quick. float32 and float16 only: the interpreter's bfloat16 tl.dot is wrong.
With ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled kernels on the GPU;
the GPU-only test at the bottom checks bfloat16 on real hardware.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_core
from ds_core import DsCoreError
from ds_core.kernels import reference

pytestmark = pytest.mark.usefixtures("needs_triton")

# compiled kernels on the GPU unless the interpreter was asked for (the CPU suite's default)
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def small_cfg(stages: int = 1):
    """Big blocks for the interpreter; stages=2 takes the software-pipelined loop."""
    from ds_core.kernels.triton_mlp import GatherConfig  # imported late: it imports triton

    return GatherConfig(block_n=64, block_k=32, k_split=64, num_warps=4, num_stages=stages)


def tmlp():
    from ds_core.kernels import triton_mlp

    return triton_mlp


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@settings(max_examples=12, deadline=None)
@given(
    n_tok=st.sampled_from([1, 2, 5, 17]),
    k=st.integers(1, 150),
    n=st.integers(1, 140),
    ratio=st.floats(0.0, 0.9),
    per_token=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    stages=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_sparse_gemv_matches_reference_on_random_shapes(n_tok, k, n, ratio, per_token, dtype, stages, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, k, generator=g).to(dtype).to(DEVICE)
    wt = (torch.randn(k, n, generator=g) / k**0.5).to(dtype).to(DEVICE)
    t = reference.topk_threshold(x, ratio).flatten() if per_token else torch.tensor(ratio)
    out = tmlp().sparse_gemv(x, wt, t, small_cfg(stages))
    assert out.dtype == torch.float32 and out.shape == (n_tok, n)
    torch.testing.assert_close(
        out, reference.sparse_gemv(x, wt, t.reshape(-1, 1) if per_token else t), **TOL[dtype]
    )


@pytest.mark.parametrize("n_tok", [1, 4])
@pytest.mark.parametrize("stages", [1, 2])
def test_sparse_gemv_never_reads_rows_of_skipped_inputs(n_tok, stages):
    x = torch.randn(n_tok, 96, device=DEVICE)
    x[:, 10:50] = 0.01  # under the threshold for every token
    wt = torch.randn(96, 64, device=DEVICE)
    wt[10:50] = float("nan")
    out = tmlp().sparse_gemv(x, wt, 0.5, small_cfg(stages))
    assert torch.isfinite(out).all()
    wt[10:50] = 0
    torch.testing.assert_close(out, reference.sparse_gemv(x, wt, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("calibrated", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fused", [True, False, "cast"])
def test_dynamic_swiglu_kernels_match_reference(make_mlp, dtype, n_tok, calibrated, bias, fused):
    m = make_mlp(d_model=48, d_ff=80, ratio=0.5, bias=bias, dtype=dtype).to(DEVICE)
    x = torch.randn(n_tok, 48).to(dtype).to(DEVICE)
    if calibrated:
        m.calibrate(torch.randn(64, 48).to(dtype).to(DEVICE))
        t_in, t_h = m.act_threshold[0], m.act_threshold[1]
    else:
        t_in, t_h = reference.topk_threshold(x, 0.5), None
    wgu_t, wd_t = m._transposed()
    b = (m.gate_proj.bias, m.up_proj.bias, m.down_proj.bias)
    with torch.no_grad():
        cfgs = (small_cfg(1 + n_tok % 2), small_cfg(2 - n_tok % 2))  # both loop forms
        out = tmlp().dynamic_swiglu(x, wgu_t, wd_t, t_in, t_h, 0.5, *b, configs=cfgs, fused=fused)
        if calibrated:
            ref = reference.dynamic_sparse_swiglu(x, *m._weights(), t_in, t_h, *b)
        else:
            xs = reference.sparsify(x, t_in)
            h = F.silu(m.gate_proj(xs)) * m.up_proj(xs)
            ref = m.down_proj(reference.sparsify(h, reference.topk_threshold(h, 0.5)))
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_epilogue_groups_several_blocks_with_a_partial_last_group(make_mlp, n_tok, bias):
    # gate/up blocks of 16 columns, down chunks of 64 rows: the gate/up epilogue finishes groups of
    # 4 blocks, and d_ff = 80 leaves a last group of one block
    from ds_core.kernels.triton_mlp import GatherConfig

    m = make_mlp(d_model=48, d_ff=80, ratio=0.5, bias=bias).to(DEVICE)
    m.calibrate(torch.randn(64, 48, device=DEVICE))
    x = torch.randn(n_tok, 48, device=DEVICE)
    t_in, t_h = m.act_threshold[0], m.act_threshold[1]
    b = (m.gate_proj.bias, m.up_proj.bias, m.down_proj.bias)
    cfgs = (GatherConfig(16, 16, 32, 4, 1), GatherConfig(16, 16, 64, 4, 1))
    with torch.no_grad():
        out = tmlp().dynamic_swiglu(x, *m._transposed(), t_in, t_h, 0.5, *b, configs=cfgs, fused=True)
        ref = reference.dynamic_sparse_swiglu(x, *m._weights(), t_in, t_h, *b)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_masking_and_dense_fallback_match_reference(make_mlp, dtype):
    g, u = torch.randn(3, 70).to(dtype).to(DEVICE), torch.randn(3, 70).to(dtype).to(DEVICE)
    t = torch.tensor([0.2, 0.5, 1.0], device=DEVICE)
    torch.testing.assert_close(tmlp().sparsify(g, t), reference.sparsify(g, t[:, None]))
    torch.testing.assert_close(tmlp().sparsify(g, t, up=u), reference.sparsify(F.silu(g) * u, t[:, None]))
    m = make_mlp(d_model=48, d_ff=80, ratio=0.5, bias=True, dtype=dtype).to(DEVICE)
    m.calibrate(torch.randn(64, 48).to(dtype).to(DEVICE))
    x = torch.randn(5, 48).to(dtype).to(DEVICE)
    b = (m.gate_proj.bias, m.up_proj.bias, m.down_proj.bias)
    with torch.no_grad():
        out = tmlp().masked_dense_swiglu(x, *m._weights(), m.act_threshold[0], m.act_threshold[1], 0.5, *b)
        ref = reference.dynamic_sparse_swiglu(x, *m._weights(), m.act_threshold[0], m.act_threshold[1], *b)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("n_tok", [1, 2, 40])  # 40 tokens: the layer's dense fallback
def test_module_on_forced_triton_equals_module_on_torch(make_mlp, n_tok, monkeypatch):
    from ds_core.kernels import triton_mlp

    monkeypatch.setitem(triton_mlp.GATE_UP_CONFIG, 1, small_cfg())
    monkeypatch.setitem(triton_mlp.GATE_UP_CONFIG, 16, small_cfg())
    monkeypatch.setitem(triton_mlp.DOWN_CONFIG, 1, small_cfg())
    monkeypatch.setitem(triton_mlp.DOWN_CONFIG, 16, small_cfg())
    monkeypatch.setattr(triton_mlp, "GATE_UP_CONFIG_HIGH_RATIO", small_cfg())
    monkeypatch.setattr(triton_mlp, "DOWN_CONFIG_HIGH_RATIO", small_cfg(2))
    m = make_mlp(d_model=40, d_ff=72, ratio=0.7).to(DEVICE)
    m.calibrate(torch.randn(64, 40, device=DEVICE))
    x = torch.randn(n_tok, 40, device=DEVICE)
    with torch.no_grad():
        on_torch = m(x, backend="torch")
        with ds_core.set_backend("triton"):
            on_triton = m(x)
        dense = make_mlp(d_model=40, d_ff=72, ratio=0.0).to(DEVICE)
        with ds_core.set_backend("triton"):  # ratio 0 is the dense layer on every backend
            assert torch.equal(dense(x), reference.swiglu(x, *dense._weights()))
    torch.testing.assert_close(on_triton, on_torch, rtol=1e-5, atol=1e-6)


def test_kernel_input_errors_name_the_argument():
    T = tmlp()
    x = torch.randn(2, 16)
    with pytest.raises(DsCoreError, match="x: expected 2 dimensions"):
        T.sparse_gemv(torch.randn(16), torch.randn(16, 8), 0.1)
    with pytest.raises(DsCoreError, match="wt: expected 16 rows"):
        T.sparse_gemv(x, torch.randn(15, 8), 0.1)
    with pytest.raises(DsCoreError, match=r"x: expected float16, bfloat16 or float32, got torch\.int32"):
        T.sparse_gemv(x.int(), torch.randn(16, 8), 0.1)
    with pytest.raises(DsCoreError, match=r"wt: dtype torch\.float16, expected torch\.float32"):
        T.sparse_gemv(x, torch.randn(16, 8).half(), 0.1)
    with pytest.raises(DsCoreError, match="wt: on meta, expected cpu"):
        T.sparse_gemv(x, torch.randn(16, 8, device="meta"), 0.1)
    with pytest.raises(DsCoreError, match="wt: expected contiguous rows"):
        T.sparse_gemv(x, torch.randn(8, 16).t(), 0.1)
    with pytest.raises(DsCoreError, match=r"threshold: expected one value or one per token \(2\)"):
        T.sparse_gemv(x, torch.randn(16, 8), torch.ones(3))
    with pytest.raises(DsCoreError, match="wgu_t, wd_t: expected shapes"):
        T.dynamic_swiglu(x, torch.randn(16, 20), torch.randn(12, 16), 0.1, 0.1, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_tok", [1, 8])
def test_bf16_kernels_on_the_gpu(make_mlp, n_tok, rel_err):
    m = make_mlp(d_model=256, d_ff=688, ratio=0.5, dtype=torch.bfloat16).cuda()
    m.calibrate(torch.randn(128, 256, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(n_tok, 256, device="cuda", dtype=torch.bfloat16)
    wgu_t, wd_t = m._transposed()
    t = m.act_threshold
    with torch.no_grad():
        out = tmlp().dynamic_swiglu(x, wgu_t, wd_t, t[0], t[1], 0.5)
        ref = reference.dynamic_sparse_swiglu(x.double(), *(w.double() for w in m._weights()), t[0], t[1])
    assert rel_err(out, ref) < 2e-2
