"""Dense one-token decode attention over a fixed-size cache (kernels/triton_decode_dense.py).

On CPU the kernel runs in Triton's interpreter (float32 / float16; bfloat16 dots are wrong there).
The reference is independent of both ds_core paths: per row, SDPA over the sliced valid slots
with the KV heads repeated for GQA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_core import DsCoreError, SparsityConfig, dense_decode_attention, sparse_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def make(B, Hq, Hkv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype).to(DEVICE) for shape in
               [(B, Hq, 1, D), (B, Hkv, S, D), (B, Hkv, S, D)])  # fmt: skip
    return q, k, v


def sliced_reference(q, k, v, start, length):
    out = []
    G = q.shape[1] // k.shape[1]
    for b, (s, e) in enumerate(zip(start.tolist(), length.tolist())):
        kb = k[b : b + 1, :, s:e].double().repeat_interleave(G, dim=1)
        vb = v[b : b + 1, :, s:e].double().repeat_interleave(G, dim=1)
        out.append(F.scaled_dot_product_attention(q[b : b + 1].double(), kb, vb))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("Hq", "Hkv"), [(2, 2), (4, 1), (12, 2)])
@pytest.mark.parametrize("split", ["0", "64"])
def test_matches_reference_ragged(needs_triton, monkeypatch, dtype, Hq, Hkv, split):
    # Ragged rows: starts and lengths not multiples of the 64-key block, one row a single slot.
    monkeypatch.setenv("DS_CORE_DECODE_SPLIT", split)
    B, S, D = 3, 150, 64
    q, k, v = make(B, Hq, Hkv, S, D, dtype)
    start = torch.tensor([0, 37, 149], device=DEVICE)
    length = torch.tensor([150, 101, 150], device=DEVICE)
    out = dense_decode_attention(q, k, v, kv_length=length, kv_start=start, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(
        out.double(), sliced_reference(q, k, v, start, length), atol=TOL[dtype], rtol=TOL[dtype]
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scalar_length_no_start_head_dim_not_power_of_two(needs_triton, backend):
    B, Hq, Hkv, S, D = 2, 4, 2, 70, 48
    q, k, v = make(B, Hq, Hkv, S, D, torch.float32, seed=1)
    length = torch.tensor(33, device=DEVICE)
    out = dense_decode_attention(q, k, v, kv_length=length, backend=backend)
    ref = sliced_reference(q, k, v, torch.zeros(B, dtype=torch.long), torch.full((B,), 33))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_slots_outside_the_range_are_never_read(needs_triton):
    # NaN in every slot outside [start, length) must not leak into the result (it would through SDPA
    # with a mask only if the kernel loaded them: 0 * NaN = NaN).
    q, k, v = make(2, 4, 1, 130, 32, torch.float32, seed=2)
    start, length = torch.tensor([5, 64], device=DEVICE), torch.tensor([70, 129], device=DEVICE)
    ref = sliced_reference(q, k, v, start, length)
    slot = torch.arange(130, device=DEVICE)
    outside = ((slot < start[:, None]) | (slot >= length[:, None]))[:, None, :, None]
    k, v = k.masked_fill(outside, float("nan")), v.masked_fill(outside, float("nan"))
    out = dense_decode_attention(q, k, v, kv_length=length, kv_start=start, backend="triton")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_sparse_attention_dense_branch_uses_it(needs_triton):
    # sparse_attention's device-length decode at ratio 0 gives the same result on both backends.
    q, k, v = make(2, 6, 1, 96, 32, torch.float32, seed=3)
    start, length = torch.tensor([0, 10], device=DEVICE), torch.tensor([96, 50], device=DEVICE)
    ref = sliced_reference(q, k, v, start, length)
    for backend in ("torch", "triton"):
        out = sparse_attention(
            q, k, v, sparsity=SparsityConfig(), kv_length=length, kv_start=start, backend=backend
        )
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_public_function_traces_without_graph_break():
    # On CPU the compiled path is the torch one (the interpreter cannot run on fake tensors).
    q, k, v = make(1, 4, 2, 80, 32, torch.float32, seed=4)
    start, length = torch.tensor([3], device=DEVICE), torch.tensor([41], device=DEVICE)
    step = torch.compile(dense_decode_attention, backend="eager", fullgraph=True)
    ref = sliced_reference(q, k, v, start, length)
    torch.testing.assert_close(step(q, k, v, length, start).double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (fake tensors cannot run the interpreter)"
)
def test_gpu_op_fake_impl_and_inductor_fullgraph():
    from ds_core.kernels import triton_decode_dense  # noqa: F401  registers the op

    q, k, v = make(1, 12, 2, 256, 128, torch.float16, seed=4)
    start, length = torch.tensor([3], device=DEVICE), torch.tensor([141], device=DEVICE)
    args = (q[:, :, 0], k, v, start, length, 128**-0.5)
    torch.library.opcheck(torch.ops.ds_core.dense_decode_attention.default, args)  # schema, fake impl
    ref = sliced_reference(q, k, v, start, length)
    step = torch.compile(dense_decode_attention, fullgraph=True)
    torch.testing.assert_close(step(q, k, v, length, start).double(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("S", [256, 4096])
def test_gpu_captured_graph_follows_the_length_on_device(S):
    q, k, v = make(1, 12, 2, S, 128, torch.bfloat16, seed=5)
    length = torch.tensor([17], device="cuda")
    dense_decode_attention(q, k, v, length)  # compile the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dense_decode_attention(q, k, v, length)
    for n in (17, 100, S - 1, S):
        length.fill_(n)
        graph.replay()
        ref = sliced_reference(q, k, v, torch.zeros(1, dtype=torch.long), torch.tensor([n]))
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_bad_shapes_raise():
    q, k, v = make(1, 4, 2, 16, 8, torch.float32)
    with pytest.raises(DsCoreError, match="one query token"):
        dense_decode_attention(q.expand(1, 4, 2, 8), k, v, torch.tensor(3, device=DEVICE))
    with pytest.raises(DsCoreError, match="kv_length: expected an integer"):
        dense_decode_attention(q, k, v, torch.tensor(3.0, device=DEVICE))
    with pytest.raises(DsCoreError, match="kv_start: expected shape"):
        dense_decode_attention(
            q, k, v, torch.tensor(3, device=DEVICE), torch.zeros(2, 2, dtype=torch.long, device=DEVICE)
        )
    with pytest.raises(DsCoreError, match="Hkv dividing"):
        dense_decode_attention(
            q, k[:, :1].expand(1, 3, 16, 8), v[:, :1].expand(1, 3, 16, 8), torch.tensor(3, device=DEVICE)
        )
    if DEVICE == "cuda":
        with pytest.raises(DsCoreError, match="kv_length: expected device cuda"):
            dense_decode_attention(q, k, v, torch.tensor(3))
