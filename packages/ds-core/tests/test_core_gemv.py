"""The batch-1 Triton GEMV (kernels/triton_gemv.py) against torch: plain, bias epilogue, SiLU·up prologue.

On CPU the kernel runs in Triton's interpreter (float32 / float16). Sizes are not multiples of
the blocks, so the masked tails are exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

tg = pytest.importorskip("ds_core.kernels.triton_gemv")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _triton_runs(needs_triton):
    """Every test here needs the kernel runnable (GPU or interpreter)."""


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("blocks", ["", "1x64", "4x32"])
@pytest.mark.parametrize(("N", "K"), [(40, 96), (300, 70), (7, 130)])
def test_plain_and_bias(monkeypatch, dtype, blocks, N, K):
    monkeypatch.setenv("DS_CORE_GEMV_BLOCKS", blocks)
    x, w, b = (
        rand(1, 1, K, dtype=dtype, seed=0),
        rand(N, K, dtype=dtype, seed=1) / K**0.5,
        rand(N, dtype=dtype, seed=2),
    )
    ref = F.linear(x.double(), w.double())
    y = tg.gemv(x, w)
    assert y.shape == (1, 1, N) and y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(
        tg.gemv(x[0, 0], w, b).double(), (ref + b.double())[0, 0], atol=TOL[dtype], rtol=TOL[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_up_prologue_is_swiglu_down(monkeypatch, dtype):
    monkeypatch.setenv("DS_CORE_GEMV_BLOCKS", "2x64")
    N, K = 48, 200
    gate, up = rand(1, K, dtype=dtype, seed=3), rand(1, K, dtype=dtype, seed=4)
    w = rand(N, K, dtype=dtype, seed=5) / K**0.5
    ref = F.linear((F.silu(gate) * up).double(), w.double())  # the unfused SwiGLU's down projection
    torch.testing.assert_close(tg.gemv(gate, w, None, up).double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_strided_weight_rows(monkeypatch):
    # A fused q/k/v buffer's row view: weight rows with a stride larger than K are not supported by
    # views with unit last stride only; a column slice is (stride(0) > K).
    monkeypatch.setenv("DS_CORE_GEMV_BLOCKS", "1x32")
    w_full = rand(20, 80, dtype=torch.float32, seed=6)
    w, x = w_full[:, :50], rand(50, dtype=torch.float32, seed=7)
    torch.testing.assert_close(tg.gemv(x, w).double(), (w.double() @ x.double()), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (fake tensors cannot run the interpreter)"
)
def test_gpu_op_checks_compile_and_graph_capture():
    x, w, b = (
        rand(1, 1536, dtype=torch.bfloat16, seed=8),
        rand(2048, 1536, dtype=torch.bfloat16, seed=9) / 40,
        rand(2048, dtype=torch.bfloat16, seed=10),
    )
    torch.library.opcheck(torch.ops.ds_core.gemv.default, (x, w, b, None))
    ref = F.linear(x.float(), w.float(), b.float())
    step = torch.compile(lambda x: torch.ops.ds_core.gemv(x, w, b) * 2, fullgraph=True)
    torch.testing.assert_close(step(x).float(), 2 * ref, atol=5e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tg.gemv(x, w, b)
    x.copy_(rand(1, 1536, dtype=torch.bfloat16, seed=11))
    graph.replay()
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), b.float()), atol=5e-2, rtol=2e-2)
