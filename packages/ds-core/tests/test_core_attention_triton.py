"""The Triton attention kernels against the PyTorch reference.

On CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): float32 and float16
only (bfloat16 dots are wrong in the interpreter), small shapes, blocks of 16+ keys. Every
kernel gets the same selection as the reference, so a mismatch is the kernel's, not a tie
broken differently.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_core import DsCoreError, SparsityConfig, set_backend, sparse_attention
from ds_core.kernels.reference_attention import (
    block_counts,
    block_scores,
    pool_keys,
    reference_sparse_attention,
    select_blocks,
)

ta = pytest.importorskip("ds_core.kernels.triton_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _triton_runs(needs_triton):
    """Every test here needs the kernels runnable (GPU or interpreter)."""


def qkv(B, Hq, Hkv, Tq, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    return make(B, Hq, Tq, D), make(B, Hkv, S, D), make(B, Hkv, S, D)


def plan(q, k, *, bs, q_start, frac=0.3, keep_blocks=None, causal=True, sinks=1, local=2):
    """Reference scores, counts and selection."""
    S = k.shape[2]
    nblk, first = -(-S // bs), q_start // bs
    nqb = (q_start + q.shape[2] - 1) // bs - first + 1
    counts = block_counts(
        first,
        nqb,
        nblk,
        causal=causal,
        sink_blocks=sinks,
        local_blocks=local,
        keep_fraction=frac,
        keep_blocks=keep_blocks,
    )
    geo = dict(
        block_size=bs, q_start=q_start, n_blocks=nblk, causal=causal, sink_blocks=sinks, local_blocks=local
    )
    scores = block_scores(q, pool_keys(k, bs), **geo)
    return scores, counts, select_blocks(scores, counts), geo


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------ decode kernels


@settings(max_examples=20, deadline=None)
@given(
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 3, 4]),
    S=st.integers(17, 300),
    D=st.sampled_from([16, 24, 32]),
    causal=st.booleans(),
    data=st.data(),
)
def test_decode_scores_and_selection_match_the_reference(Hkv, G, S, D, causal, data):
    q_start = data.draw(st.integers(0, S - 1))
    q, k, _ = qkv(2, G * Hkv, Hkv, 1, S, D, torch.float32, data.draw(st.integers(0, 999)))
    scores, counts, idx, geo = plan(
        q, k, bs=16, q_start=q_start, frac=data.draw(st.sampled_from([0.1, 0.4])), causal=causal
    )
    got = ta.decode_block_scores(q, pool_keys(k, 16), **geo)
    inf = float("inf")
    assert torch.equal(got == inf, scores == inf) and torch.equal(got == -inf, scores == -inf)
    finite = torch.isfinite(scores)
    torch.testing.assert_close(got[finite], scores[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(ta.select_top_blocks(scores, int(counts[0])), idx)
    # scores and selection fused in one launch (the decode path of sparse_attention)
    assert torch.equal(ta.decode_top_blocks(q, pool_keys(k, 16), int(counts[0]), **geo), idx)
    assert int(ta._ticket_buffer(q.device, 2, "select")[:2].abs().sum()) == 0


@pytest.mark.parametrize("n", [7, 300, 1024, 1500])  # 1500 > RADIX_MAX_BLOCKS: the bisection path
@pytest.mark.parametrize("count", [1, 5, 64])
def test_selection_of_long_rows_with_ties_equals_topk(n, count):
    g = torch.Generator().manual_seed(n + count)
    # few distinct values (many ties), negatives, zeros, and forced / hidden blocks
    scores = torch.randint(-4, 5, (3, n), generator=g).float() * 0.25
    scores[0, :2] = float("inf")
    scores[1, -3:] = float("-inf")
    count = min(count, n - 3)
    want = scores.topk(count, dim=-1, sorted=False).indices  # ties: torch picks any; compare sets by value
    got = ta.select_top_blocks(scores.to(DEVICE), count).cpu().long()
    assert (got.diff(dim=-1) > 0).all()  # ascending, no repeats
    assert torch.equal(scores.gather(1, got).sort(-1).values, scores.gather(1, want).sort(-1).values)
    # ties go to the lower index: every kept value equal to the threshold precedes any dropped one
    thr = scores.gather(1, got).min(-1, keepdim=True).values
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, got, True)
    for r in range(3):
        tied = (scores[r] == thr[r]).nonzero().flatten()
        assert kept[r, tied].long().diff().le(0).all()


def test_selection_ties_go_to_the_lower_block():
    inf = float("inf")
    scores = torch.tensor([[[[1.0, 5.0, 2.0, 5.0, 5.0, -inf, inf, 0.5]]]], device=DEVICE)
    assert ta.select_top_blocks(scores, 3)[0, 0, 0].tolist() == [1, 3, 6]
    assert ta.select_top_blocks(scores, 1)[0, 0, 0].tolist() == [6]
    assert ta.select_top_blocks(scores, 7)[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("B", "Hq", "Hkv", "S", "D", "bs", "q_start", "causal", "n_splits"),
    [
        (2, 4, 2, 300, 32, 16, 299, True, None),  # last token of the cache, default splits
        (1, 6, 2, 500, 24, 16, 499, True, 3),  # head dim not a power of two, G = 3
        (2, 4, 2, 300, 32, 16, 150, True, 1),  # a query in the middle: the causal mask cuts a block
        (1, 8, 1, 260, 16, 32, 259, False, 2),  # MQA, non-causal
    ],
)
def test_decode_attention_matches_the_reference(dtype, B, Hq, Hkv, S, D, bs, q_start, causal, n_splits):
    q, k, v = qkv(B, Hq, Hkv, 1, S, D, dtype, seed=S)
    _, counts, idx, _ = plan(q, k, bs=bs, q_start=q_start, causal=causal)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=bs, q_start=q_start, causal=causal)
    out = ta.block_sparse_decode(
        q, k, v, idx, block_size=bs, q_start=q_start, causal=causal, n_splits=n_splits
    )
    assert rel(out, ref) < TOL[dtype]


def test_decode_is_repeatable_and_resets_its_tickets():
    """The split merge uses an atomic ticket per row; it must be back to 0 after every launch."""
    q, k, v = qkv(1, 4, 2, 1, 200, 16, torch.float32, seed=1)
    idx = plan(q, k, bs=16, q_start=199)[2]
    outs = [ta.block_sparse_decode(q, k, v, idx, block_size=16, q_start=199, n_splits=4) for _ in range(3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert int(ta._ticket_buffer(q.device, 2)[:2].abs().sum()) == 0


# ------------------------------------------------------------------ prefill kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("Hq", "Hkv", "Tq", "S", "D", "bs", "q_start", "causal", "hpp"),
    [
        (4, 2, 96, 96, 32, 16, 0, True, 2),  # full prefill, two heads per program
        (4, 1, 37, 150, 16, 16, 100, True, 4),  # a chunk of queries not aligned to blocks, MQA
        (3, 3, 50, 80, 24, 16, 30, True, 1),  # head dim not a power of two
        (4, 2, 20, 64, 16, 32, 10, False, 1),  # non-causal, 32-key blocks
    ],
)
def test_prefill_matches_the_reference(dtype, Hq, Hkv, Tq, S, D, bs, q_start, causal, hpp):
    q, k, v = qkv(2, Hq, Hkv, Tq, S, D, dtype, seed=Tq)
    _, counts, idx, _ = plan(q, k, bs=bs, q_start=q_start, frac=0.4, causal=causal)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=bs, q_start=q_start, causal=causal)
    out = ta.block_sparse_prefill(
        q, k, v, idx, counts, block_size=bs, q_start=q_start, causal=causal, heads_per_program=hpp
    )
    assert rel(out, ref) < TOL[dtype]


def test_prefill_rejects_a_head_grouping_that_does_not_divide_the_group():
    q, k, v = qkv(1, 6, 2, 16, 16, 16, torch.float32, seed=0)
    _, counts, idx, _ = plan(q, k, bs=16, q_start=0)
    with pytest.raises(DsCoreError, match="heads_per_program"):
        ta.block_sparse_prefill(q, k, v, idx, counts, block_size=16, q_start=0, heads_per_program=2)


# ------------------------------------------------------------------ the whole op through dispatch


@pytest.mark.parametrize(
    ("Tq", "S", "q_start", "cfg"),
    [
        (1, 400, 399, SparsityConfig(attention_keep_keys=64, attention_block_size=16)),
        (64, 64, 0, SparsityConfig(attention_sparse_ratio=0.7, attention_block_size=16)),
        (20, 130, 105, SparsityConfig(attention_sparse_ratio=0.5, attention_block_size=32, sink_blocks=2)),
    ],
)
def test_triton_op_matches_the_torch_op(Tq, S, q_start, cfg):
    q, k, v = qkv(1, 4, 2, Tq, S, 32, torch.float32, seed=S)
    out = sparse_attention(q, k, v, sparsity=cfg, q_start=q_start, backend="triton")
    want = sparse_attention(q, k, v, sparsity=cfg, q_start=q_start, backend="torch")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    with set_backend("triton"):  # the forced backend reaches the same kernels
        torch.testing.assert_close(sparse_attention(q, k, v, sparsity=cfg, q_start=q_start), out)


def test_long_rows_select_in_torch_and_still_match(monkeypatch):
    """Rows longer than the in-register selection fall back to the PyTorch top-k."""
    monkeypatch.setattr(ta, "MAX_SELECT_BLOCKS", 8)
    q, k, v = qkv(1, 4, 2, 1, 300, 16, torch.float32, seed=3)
    cfg = SparsityConfig(attention_keep_keys=64, attention_block_size=16)
    out = sparse_attention(q, k, v, sparsity=cfg, backend="triton")
    torch.testing.assert_close(
        out, sparse_attention(q, k, v, sparsity=cfg, backend="torch"), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(DsCoreError, match="scores: rows of at most 8 blocks"):
        ta.select_top_blocks(torch.zeros(1, 20, device=DEVICE), 4)


def test_triton_refuses_a_block_size_it_cannot_tile():
    q, k, v = qkv(1, 4, 2, 1, 100, 16, torch.float32, seed=0)
    cfg = SparsityConfig(attention_sparse_ratio=0.5, attention_block_size=24)
    with pytest.raises(DsCoreError, match="backend: attention_block_size must be a power of two"):
        sparse_attention(q, k, v, sparsity=cfg, backend="triton")
    # "auto" on a GPU falls back to the torch path instead of failing
    out = sparse_attention(q, k, v, sparsity=cfg, backend="auto")
    torch.testing.assert_close(out, sparse_attention(q, k, v, sparsity=cfg, backend="torch"))


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 2, 4]),
    S=st.integers(1, 160),
    D=st.sampled_from([16, 32, 40]),
    bs=st.sampled_from([16, 32]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    data=st.data(),
)
def test_kernels_match_the_reference_on_random_shapes(B, Hkv, G, S, D, bs, causal, dtype, data):
    Tq = data.draw(st.sampled_from([1, data.draw(st.integers(1, S))]))
    q_start = data.draw(st.integers(0, S - Tq))
    q, k, v = qkv(B, G * Hkv, Hkv, Tq, S, D, dtype, seed=data.draw(st.integers(0, 999)))
    frac = data.draw(st.sampled_from([0.1, 0.5]))
    _, counts, idx, _ = plan(
        q, k, bs=bs, q_start=q_start, frac=frac, causal=causal, sinks=data.draw(st.integers(0, 2))
    )
    kw = dict(block_size=bs, q_start=q_start, causal=causal)
    ref = reference_sparse_attention(q, k, v, idx, counts, **kw)
    if Tq == 1:
        out = ta.block_sparse_decode(q, k, v, idx, n_splits=data.draw(st.sampled_from([None, 1, 2])), **kw)
    else:
        out = ta.block_sparse_prefill(
            q, k, v, idx, counts, heads_per_program=data.draw(st.sampled_from([1, G])), **kw
        )
    assert torch.isfinite(out).all()
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="bf16 dots need the compiled kernels on a CUDA GPU (run with TRITON_INTERPRET=0)",
)
def test_bf16_on_the_gpu_matches_the_reference():
    for Tq, S, q_start in [(1, 4096, 4095), (1, 3000, 1000), (512, 512, 0), (100, 700, 600)]:
        q, k, v = qkv(2, 8, 2, Tq, S, 128, torch.bfloat16, seed=Tq + S)
        _, counts, idx, _ = plan(q, k, bs=64, q_start=q_start, frac=0.2)
        ref = reference_sparse_attention(q, k, v, idx, counts, block_size=64, q_start=q_start)
        if Tq == 1:
            out = ta.block_sparse_decode(q, k, v, idx, block_size=64, q_start=q_start)
        else:
            out = ta.block_sparse_prefill(q, k, v, idx, counts, block_size=64, q_start=q_start)
        assert rel(out, ref) < 1e-2


# ------------------------------------------------------------------ decode with the length on the device


def device_length_case(B, Hkv, G, S, D, bs, starts, dtype, seed):
    """q, a fixed-size cache and a row-relative pooled-key cache (zeros: every call refreshes its block)."""
    q, k, v = qkv(B, Hkv * G, Hkv, 1, S, D, dtype, seed)
    return q, k, v, torch.zeros(B, Hkv, -(-S // bs), D, dtype=dtype, device=DEVICE)


def prefix_call(q, k, v, cfg, starts, length):
    """The Python-int reference: each row's valid slice through the torch backend."""
    rows = [
        sparse_attention(
            q[b : b + 1], k[b : b + 1, :, s:length], v[b : b + 1, :, s:length], sparsity=cfg, backend="torch"
        )
        for b, s in enumerate(starts)
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("fused", [True, False])  # one launch for small caches, or scores + split attention
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 4]),
    S=st.integers(40, 200),
    bs=st.sampled_from([16, 32]),
    ratio=st.sampled_from([0.3, 0.7]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    data=st.data(),
)
def test_device_length_kernels_match_the_prefix_call(
    monkeypatch, fused, B, Hkv, G, S, bs, ratio, dtype, data
):
    monkeypatch.setattr(ta, "FUSED_MAX_BLOCKS", 64 if fused else 0)
    # lengths of any remainder modulo the block size, down to fewer keys than sinks + window
    length = data.draw(st.integers(1, S), label="length")
    starts = data.draw(st.lists(st.integers(0, length - 1), min_size=B, max_size=B), label="starts")
    q, k, v, pooled = device_length_case(B, Hkv, G, S, 16, bs, starts, dtype, seed=S)
    for b, s in enumerate(starts):  # what a decoder's cache holds before this step
        pool_keys(k[b : b + 1, :, s:length], bs, out=pooled[b : b + 1])
    cfg = SparsityConfig(attention_sparse_ratio=ratio, attention_block_size=bs)
    start_t = torch.tensor(starts, device=DEVICE)
    out = sparse_attention(
        q, k, v, sparsity=cfg, kv_length=torch.tensor([length], device=DEVICE), kv_start=start_t, pooled_k=pooled,
        backend="triton",
    )  # fmt: skip
    want = prefix_call(q, k, v, cfg, starts, length)
    assert rel(out, want) < TOL[dtype]


@pytest.mark.parametrize("fused", [True, False])
def test_device_length_kernels_keep_the_pooled_cache_over_a_growing_length(monkeypatch, fused):
    monkeypatch.setattr(ta, "FUSED_MAX_BLOCKS", 64 if fused else 0)
    # A decode loop: the length grows by one per call; the scores kernel alone writes each
    # completed block's mean into the (initially empty) pooled cache, and every step matches.
    B, S, bs = 2, 150, 16
    starts = [0, 21]
    q, k, v, pooled = device_length_case(B, 2, 2, S, 16, bs, starts, torch.float32, seed=9)
    cfg = SparsityConfig(attention_sparse_ratio=0.7, attention_block_size=bs)
    start_t = torch.tensor(starts, device=DEVICE)
    for length in range(22, S + 1):
        n = torch.tensor([length], device=DEVICE)
        out = sparse_attention(
            q, k, v, sparsity=cfg, kv_length=n, kv_start=start_t, pooled_k=pooled, backend="triton"
        )
        assert rel(out, prefix_call(q, k, v, cfg, starts, length)) < 1e-4, length
    for b, s in enumerate(starts):
        full = pool_keys(k[b : b + 1, :, s:S], bs)[0, :, : (S - s) // bs]
        torch.testing.assert_close(pooled[b, :, : full.shape[1]], full, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="CUDA-graph capture needs the compiled kernels on a CUDA GPU (run with TRITON_INTERPRET=0)",
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("S", [4096, 640])  # 20 of 64 blocks kept: split attention; 3 of 10: one launch
def test_device_length_decode_is_captured_once_and_replayed_at_every_length(dtype, S):
    B, Hkv, G, bs = 2, 8, 4, 64
    q, k, v, pooled = device_length_case(B, Hkv, G, S, 128, bs, [0, 100], dtype, seed=1)
    cfg = SparsityConfig(attention_sparse_ratio=0.7, attention_block_size=bs)
    start_t = torch.tensor([0, 100], device=DEVICE)
    n = torch.tensor([200], device=DEVICE)
    for b, s in enumerate([0, 100]):
        pool_keys(k[b : b + 1, :, s:199], bs, out=pooled[b : b + 1])

    def step():
        return sparse_attention(q, k, v, sparsity=cfg, kv_length=n, kv_start=start_t, pooled_k=pooled)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # builds the count table and tickets before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for length in [n for n in (200, 201, 600, 639, 640, 1000, 1023, 1024, 4095, 4096) if n <= S]:
        for b, s in enumerate([0, 100]):  # the cache as a decoder would hold it at this length
            pool_keys(k[b : b + 1, :, s : length - 1], bs, out=pooled[b : b + 1])
        n.fill_(length)
        graph.replay()
        want = prefix_call(q, k, v, cfg, [0, 100], length)
        assert rel(out, want) < (1e-2 if dtype == torch.bfloat16 else 1e-4), length
