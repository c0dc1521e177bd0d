"""Adaptive sparse attention: semantics (reference), the PyTorch gather path, dense equivalence, errors.

The Triton kernels are checked against the same reference in test_core_attention_triton.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_core import DsCoreError, SparseAttention, SparsityConfig, sparse_attention
from ds_core.backends import triton_available
from ds_core.kernels.reference_attention import (
    block_counts,
    block_scores,
    gather_sparse_attention,
    pool_keys,
    reference_sparse_attention,
    select_blocks,
)


def qkv(B=1, Hq=4, Hkv=2, Tq=8, S=64, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def dense(q, k, v, q_start, causal=True):
    """Plain causal attention in float64, queries at q_start.."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    att = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        qpos = torch.arange(q_start, q_start + q.shape[2])
        att = att.masked_fill(torch.arange(k.shape[2])[None, :] > qpos[:, None], -math.inf)
    return (att.softmax(-1) @ vv).to(q.dtype)


def selection(q, k, *, bs, q_start, frac=0.3, keep_blocks=None, causal=True, sinks=1, local=2):
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
    scores = block_scores(
        q,
        pool_keys(k, bs),
        block_size=bs,
        q_start=q_start,
        n_blocks=nblk,
        causal=causal,
        sink_blocks=sinks,
        local_blocks=local,
    )
    return select_blocks(scores, counts), counts, scores


def skip_unless_runs(backend):
    if backend == "triton" and not triton_available("cpu"):  # these tests use CPU tensors
        pytest.skip("triton kernels on CPU tensors need TRITON_INTERPRET=1")


# ------------------------------------------------------------------ ratio 0 is dense attention


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    ("Tq", "S", "q_start", "causal"),
    [(48, 48, 0, True), (1, 77, 76, True), (5, 77, 40, True), (7, 30, 23, False), (1, 30, 10, True)],
)
def test_ratio_zero_is_exact_dense_attention(backend, Tq, S, q_start, causal):
    skip_unless_runs(backend)
    q, k, v = qkv(B=2, Hq=6, Hkv=2, Tq=Tq, S=S)
    out = sparse_attention(
        q, k, v, sparsity=SparsityConfig(), causal=causal, q_start=q_start, backend=backend
    )
    G = 3
    mask = None
    if causal:
        mask = torch.arange(S)[None, :] <= torch.arange(q_start, q_start + Tq)[:, None]
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask
    )
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, dense(q, k, v, q_start, causal), rtol=1e-5, atol=1e-5)


def test_budget_covering_every_block_is_dense():
    q, k, v = qkv(Tq=1, S=100)
    cfg = SparsityConfig(attention_keep_keys=128, attention_block_size=16)
    torch.testing.assert_close(
        sparse_attention(q, k, v, sparsity=cfg), dense(q, k, v, 99), rtol=1e-5, atol=1e-5
    )
    # and the reference says the same when it keeps every visible block
    idx, counts, _ = selection(q, k, bs=16, q_start=99, frac=1.0)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=16, q_start=99)
    torch.testing.assert_close(ref, dense(q, k, v, 99), rtol=1e-5, atol=1e-5)


def test_sparse_output_differs_from_dense():
    """A high ratio really drops keys (guards against a selection that keeps everything)."""
    q, k, v = qkv(Tq=1, S=256)
    out = sparse_attention(
        q, k, v, sparsity=SparsityConfig(attention_sparse_ratio=0.9, attention_block_size=16)
    )
    assert (out - dense(q, k, v, 255)).abs().max() > 1e-3


# ------------------------------------------------------------------ selection semantics


def test_block_counts_follow_the_ratio_and_force_sinks_and_window():
    # causal, 10 query blocks, keep 30%: ceil(0.3 * (a + 1)) but at least sinks + window
    counts = block_counts(
        0, 10, 10, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=0.3, keep_blocks=None
    )
    assert counts.tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    # (1 - 0.7) * 10 is 3.0000000000000004 in floating point: still 3 blocks, not 4
    c = block_counts(
        9, 1, 10, causal=True, sink_blocks=0, local_blocks=1, keep_fraction=1 - 0.7, keep_blocks=None
    )
    assert c.tolist() == [3]
    c = block_counts(
        0, 40, 40, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=0.5, keep_blocks=None
    )
    assert c[-1] == 20 and c[9] == 5
    # an explicit key budget: ceil(keys / bs) blocks, capped by what is visible
    c = block_counts(0, 8, 8, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=1.0, keep_blocks=4)
    assert c.tolist() == [1, 2, 3, 4, 4, 4, 4, 4]
    # non-causal: every block is visible to every query block
    c = block_counts(
        0, 4, 4, causal=False, sink_blocks=1, local_blocks=1, keep_fraction=0.5, keep_blocks=None
    )
    assert c.tolist() == [2, 2, 2, 2]


def test_selection_keeps_sinks_window_and_the_best_scoring_block():
    bs, S = 8, 96  # 12 key blocks
    q, k, _ = qkv(Hq=2, Hkv=1, Tq=1, S=S, D=16, seed=1)
    group_q = q[:, :, 0].sum(1)  # (1, D): the GQA group's query
    k[:, :, 40:48] = 6.0 * group_q / group_q.norm()  # block 5 points along it
    idx, counts, scores = selection(q, k, bs=bs, q_start=S - 1, frac=0.0, keep_blocks=4, sinks=1, local=2)
    assert counts.tolist() == [4]
    assert idx[0, 0, 0].tolist() == [0, 5, 10, 11]  # sink, best score, local window; ascending
    assert torch.isinf(scores[0, 0, 0, [0, 10, 11]]).all()


def test_selection_is_shared_by_the_heads_of_a_gqa_group():
    """The group score is the sum over its heads: the block favoured by the group sum wins."""
    bs, D = 4, 8
    q = torch.zeros(1, 2, 1, D)
    q[0, 0, 0, 0], q[0, 1, 0, 1] = 1.0, 3.0  # head 0 likes dim 0, head 1 likes dim 1 more
    k = torch.zeros(1, 1, 32, D)
    k[0, 0, 8:12, 0] = 2.0  # block 2: good for head 0 (score 2)
    k[0, 0, 16:20, 1] = 1.0  # block 4: good for head 1 (score 3)
    idx, _, _ = selection(q, k, bs=bs, q_start=31, frac=0.0, keep_blocks=4, sinks=1, local=2)
    assert idx[0, 0, 0].tolist() == [0, 4, 6, 7]


def test_no_query_block_selects_a_future_block():
    q, k, _ = qkv(Tq=64, S=64, seed=3)
    idx, counts, _ = selection(q, k, bs=8, q_start=0, frac=0.5)
    for a in range(idx.shape[2]):
        kept = idx[:, :, a, : counts[a]]
        assert (kept <= a).all() and (kept[..., -1] == a).all()  # the diagonal block is last


def test_pool_keys_incremental_cache_matches_a_full_pooling():
    _, k, _ = qkv(S=70)
    full = pool_keys(k, 16)
    assert full.shape[2] == 5
    torch.testing.assert_close(full[:, :, 4], k[:, :, 64:70].mean(2))  # partial block: valid keys only
    cache = torch.zeros(1, 2, 8, 16)
    pool_keys(k[:, :, :40], 16, out=cache)
    pool_keys(k, 16, out=cache, start=40)  # refresh from position 40 on: blocks 2, 3, 4
    torch.testing.assert_close(cache[:, :, :5], full)


# ------------------------------------------------------------------ the gather (CPU) path


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 3]),
    S=st.integers(1, 90),
    D=st.sampled_from([8, 12]),
    bs=st.sampled_from([4, 8, 16]),
    data=st.data(),
)
def test_gather_path_matches_reference(B, Hkv, G, S, D, bs, data):
    Tq = data.draw(st.integers(1, S))
    q_start = data.draw(st.integers(0, S - Tq))
    causal = data.draw(st.booleans())
    frac = data.draw(st.sampled_from([0.1, 0.5, 1.0]))
    q, k, v = qkv(B=B, Hq=G * Hkv, Hkv=Hkv, Tq=Tq, S=S, D=D, seed=data.draw(st.integers(0, 1000)))
    idx, counts, _ = selection(q, k, bs=bs, q_start=q_start, frac=frac, causal=causal)
    kw = dict(block_size=bs, q_start=q_start, causal=causal)
    ref = reference_sparse_attention(q, k, v, idx, counts, **kw)
    got = gather_sparse_attention(q, k, v, idx, counts, max_chunk_bytes=4096, **kw)  # several chunks
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_equals_the_reference_composition(dtype):
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Tq=37, S=150, D=16, dtype=dtype, seed=5)
    cfg = SparsityConfig(attention_sparse_ratio=0.6, attention_block_size=16, sink_blocks=1, local_blocks=1)
    out = sparse_attention(q, k, v, sparsity=cfg, q_start=100, backend="torch")
    idx, counts, _ = selection(q, k, bs=16, q_start=100, frac=0.4, local=1)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=16, q_start=100)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_pooled_key_cache_gives_the_same_result():
    q, k, v = qkv(Tq=1, S=200, seed=7)
    cfg = SparsityConfig(attention_keep_keys=48, attention_block_size=16)
    cache = torch.zeros(1, 2, 20, 16)
    pool_keys(k, 16, out=cache)
    torch.testing.assert_close(
        sparse_attention(q, k, v, sparsity=cfg, pooled_k=cache), sparse_attention(q, k, v, sparsity=cfg)
    )


def test_local_blocks_zero_still_attends_to_the_own_block():
    q, k, v = qkv(Tq=16, S=16, seed=2)
    cfg = SparsityConfig(attention_sparse_ratio=0.5, attention_block_size=4, sink_blocks=0, local_blocks=0)
    out = sparse_attention(q, k, v, sparsity=cfg)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 0], dense(q, k, v, 0)[:, :, 0])  # the first query sees itself only


def test_module_wraps_the_function():
    cfg = SparsityConfig(attention_sparse_ratio=0.5, attention_block_size=8)
    attn = SparseAttention(cfg, backend="torch")
    q, k, v = qkv(Tq=3, S=40)
    torch.testing.assert_close(attn(q, k, v), sparse_attention(q, k, v, sparsity=cfg, backend="torch"))
    torch.testing.assert_close(
        attn(q, k, v, q_start=10), sparse_attention(q, k, v, sparsity=cfg, q_start=10, backend="torch")
    )
    assert list(attn.parameters()) == [] and attn.state_dict() == {}
    assert "ratio=0.5" in repr(attn) and "block_size=8" in repr(attn)


# ------------------------------------------------------------------ errors name the argument


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda q, k, v: (q[0], k, v), "q: expected a 4-d tensor"),
        (lambda q, k, v: (q, k.double(), v), "k: expected dtype"),
        (lambda q, k, v: (q.int(), k, v), "q: expected dtype float16, bfloat16 or float32"),
        (lambda q, k, v: (q, k, v[:, :, :-1]), "v: expected shape"),
        (lambda q, k, v: (q, k[:, :, :, :8], v[:, :, :, :8]), "k: expected batch 1 and head dim 16"),
        (lambda q, k, v: (q[:, :3], k, v), "k: 2 KV heads must divide the 3 query heads"),
        (lambda q, k, v: (q, k.to("meta"), v), "k: expected device cpu"),
        (lambda q, k, v: (q, k[:, :, :4], v[:, :, :4]), "q: 8 queries cannot be among the 4 keys"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, needle):
    q, k, v = qkv(Tq=8, S=64)
    with pytest.raises(DsCoreError) as err:
        sparse_attention(*change(q, k, v), sparsity=SparsityConfig(attention_sparse_ratio=0.5))
    assert needle in str(err.value)


def test_bad_keyword_arguments_raise_naming_them():
    q, k, v = qkv(Tq=2, S=64)
    cfg = SparsityConfig(attention_sparse_ratio=0.5, attention_block_size=16)
    for kwargs, needle in [
        (dict(q_start=63), "q_start"),
        (dict(q_start=True), "q_start"),
        (dict(causal="yes"), "causal"),
        (dict(sparsity={"attention_sparse_ratio": 0.5}), "sparsity"),
        (dict(pooled_k=torch.zeros(1, 2, 2, 16)), "pooled_k: expected shape (1, 2, >=4, 16)"),
        (dict(backend="cuda"), "backend"),
    ]:
        kwargs.setdefault("sparsity", cfg)
        with pytest.raises(DsCoreError) as err:
            sparse_attention(q, k, v, **kwargs)
        assert needle in str(err.value), (kwargs, str(err.value))


# ------------------------------------------------------------------ decode with the length on the device


def cache_case(B, Hkv, G, S, D, bs, starts, length, dtype=torch.float32, seed=0):
    """A fixed-size cache (B, Hkv, S, D), one query per row, and a row-relative pooled-key cache
    that is exact except for each row's latest complete block (stale, as before a decode step)."""
    q, k, v = qkv(B=B, Hq=Hkv * G, Hkv=Hkv, Tq=1, S=S, D=D, dtype=dtype, seed=seed)
    pooled = torch.zeros(B, Hkv, -(-S // bs), D, dtype=dtype)
    for b, s0 in enumerate(starts):
        pool_keys(k[b : b + 1, :, s0:length], bs, out=pooled[b : b + 1])
        c = (length - s0) // bs - 1
        if c >= 0:
            pooled[b, :, c] = 7.0
    return q, k, v, pooled


def check_device_length(backend, B, Hkv, G, S, D, bs, starts, length, ratio, dtype, seed=0, tol=None):
    """The device-length call equals the Python-int call on each row's slice, and fixes the pooled cache."""
    q, k, v, pooled = cache_case(B, Hkv, G, S, D, bs, starts, length, dtype, seed)
    cfg = SparsityConfig(attention_sparse_ratio=ratio, attention_block_size=bs)
    out = sparse_attention(
        q,
        k,
        v,
        sparsity=cfg,
        kv_length=torch.tensor([length]),
        kv_start=torch.tensor(starts),
        pooled_k=pooled,
        backend=backend,
    )
    tol = tol or {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for b, s0 in enumerate(starts):
        want = sparse_attention(
            q[b : b + 1], k[b : b + 1, :, s0:length], v[b : b + 1, :, s0:length], sparsity=cfg
        )
        torch.testing.assert_close(out[b : b + 1], want, rtol=tol, atol=tol)
        full = pool_keys(k[b : b + 1, :, s0:length], bs)[0, :, : (length - s0) // bs]
        torch.testing.assert_close(pooled[b, :, : full.shape[1]].float(), full, rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("starts", "length"),
    [
        ([0], 200),  # blocks 0..12, the last partial: selection drops most of them
        ([0, 37, 5], 193),  # left padding: each row counts blocks from its own first key
        ([3, 0], 40),  # shorter than sinks + window: every block kept (dense)
        ([0], 64),  # a whole number of blocks; the last one just completed
    ],
)
def test_device_length_decode_equals_the_prefix_call(dtype, starts, length):
    check_device_length("torch", len(starts), 2, 2, 256, 16, 16, starts, length, 0.7, dtype)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 3, 4]),
    S=st.integers(20, 180),
    bs=st.sampled_from([8, 16, 32]),
    ratio=st.sampled_from([0.3, 0.5, 0.9]),
    data=st.data(),
)
def test_device_length_decode_on_random_lengths(B, Hkv, G, S, bs, ratio, data):
    length = data.draw(st.integers(1, S), label="length")
    starts = data.draw(st.lists(st.integers(0, length - 1), min_size=B, max_size=B), label="starts")
    check_device_length("torch", B, Hkv, G, S, 8, bs, starts, length, ratio, torch.float32)


def test_device_length_decode_is_sparse_and_tracks_a_growing_length():
    # One cache, the length growing by one per call as in a decode loop: the op alone keeps the
    # pooled cache exact (it starts all zeros) and matches the prefix call at every length.
    q, k, v = qkv(B=1, Hq=4, Hkv=2, Tq=1, S=160, D=16, seed=3)
    cfg = SparsityConfig(attention_sparse_ratio=0.7, attention_block_size=16)
    pooled = torch.zeros(1, 2, 10, 16)
    for length in range(1, 161):
        out = sparse_attention(q, k, v, sparsity=cfg, kv_length=torch.tensor(length), pooled_k=pooled)
        want = sparse_attention(q, k[:, :, :length], v[:, :, :length], sparsity=cfg)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, pool_keys(k, 16))
    assert (out - dense(q, k, v, 159)).abs().max() > 1e-3  # 3 of 10 blocks kept: not dense


def test_device_length_without_a_pooled_cache_and_at_ratio_zero():
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Tq=1, S=100, D=16, seed=4)
    kw = dict(kv_length=torch.tensor([90, 70]), kv_start=torch.tensor([0, 9]))
    for cfg in (SparsityConfig(attention_sparse_ratio=0.6, attention_block_size=16), None):
        out = sparse_attention(q, k, v, sparsity=cfg, **kw)
        for b, (s0, n) in enumerate([(0, 90), (9, 70)]):
            want = sparse_attention(q[b : b + 1], k[b : b + 1, :, s0:n], v[b : b + 1, :, s0:n], sparsity=cfg)
            torch.testing.assert_close(out[b : b + 1], want, rtol=1e-5, atol=1e-5)


def test_device_length_bad_arguments_raise_naming_them():
    q, k, v = qkv(B=2, Tq=1, S=64)
    cfg = SparsityConfig(attention_sparse_ratio=0.5, attention_block_size=16)
    n = torch.tensor([64])
    for kwargs, needle in [
        (dict(kv_length=64), "kv_length: expected an integer torch.Tensor"),
        (dict(kv_length=n.float()), "kv_length: expected an integer tensor"),
        (dict(kv_length=torch.tensor([1, 2, 3])), "kv_length: expected shape (), (1,) or (2,)"),
        (dict(kv_length=n, kv_start=torch.zeros(2, 1, dtype=torch.long)), "kv_start: expected shape"),
        (dict(kv_start=torch.zeros(2, dtype=torch.long)), "kv_start: only meaningful with kv_length"),
        (dict(kv_length=n, q_start=63), "q_start: not used with kv_length"),
        (dict(kv_length=n, pooled_k=torch.zeros(2, 2, 3, 16)), "pooled_k: expected shape (2, 2, >=4, 16)"),
        (dict(kv_length=n.to("meta")), "kv_length: expected device cpu"),
    ]:
        with pytest.raises(DsCoreError) as err:
            sparse_attention(q, k, v, sparsity=cfg, **kwargs)
        assert needle in str(err.value), (kwargs, str(err.value))
    with pytest.raises(DsCoreError, match="one-token decode"):
        sparse_attention(*qkv(Tq=2, S=64), sparsity=cfg, kv_length=n)
