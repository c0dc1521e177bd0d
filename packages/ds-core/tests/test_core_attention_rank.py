"""The rank-select decode kernel (``triton_rank.rank_decode``) against the PyTorch reference.

Each program ranks its own slice of key blocks against the whole row of block scores and attends
to those of rank < count. The GPU tests at the bottom run the compiled kernels at the issue-3 and
ds-7b shapes and replay them in a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

from ds_core import SparsityConfig, sparse_attention
from ds_core.kernels.reference_attention import (
    block_counts,
    block_scores,
    pool_keys,
    reference_sparse_attention,
    select_blocks,
)

ta = pytest.importorskip("ds_core.kernels.triton_attention")
tr = pytest.importorskip("ds_core.kernels.triton_rank")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GPU = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _triton_runs(needs_triton):
    """Every test here needs the kernels runnable (GPU or interpreter)."""


def rows_alone(q, k, v, cfg, starts, length, pooled=None):
    """The torch path on each row alone, sliced to its valid keys [start, length): the reference
    of a device-length decode over left-padded rows."""
    return torch.cat(
        [
            sparse_attention(
                q[b : b + 1],
                k[b : b + 1, :, s:length],
                v[b : b + 1, :, s:length],
                sparsity=cfg,
                pooled_k=None if pooled is None else pooled[b : b + 1],
                backend="torch",
            )
            for b, s in enumerate(starts)
        ]
    )


def case(B, Hq, Hkv, S, D, dtype, seed, *, bs, frac, q_start=None, causal=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(*s, generator=g).to(dtype).to(DEVICE)
        for s in ((B, Hq, 1, D), (B, Hkv, S, D), (B, Hkv, S, D))
    )
    q_start = S - 1 if q_start is None else q_start
    nblk = -(-S // bs)
    counts = block_counts(
        q_start // bs,
        1,
        nblk,
        causal=causal,
        sink_blocks=1,
        local_blocks=2,
        keep_fraction=frac,
        keep_blocks=None,
    )
    geo = dict(block_size=bs, q_start=q_start, n_blocks=nblk, causal=causal, sink_blocks=1, local_blocks=2)
    pooled = pool_keys(k, bs)
    scores = block_scores(q, pooled, **geo)
    idx = select_blocks(scores, counts)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=bs, q_start=q_start, causal=causal)
    return q, k, v, pooled, scores, counts, idx, ref


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    ("dtype", "B", "Hq", "Hkv", "S", "D", "bs", "frac", "q_start", "causal", "knobs"),
    [
        (torch.float32, 2, 4, 4, 1000, 32, 16, 0.7, None, True, {}),  # MHA, most blocks kept
        (torch.float32, 1, 4, 4, 1000, 32, 16, 0.7, None, True, {"dot": False}),  # MHA on the CUDA cores
        (torch.float16, 2, 8, 2, 900, 64, 32, 0.2, None, True, {}),  # GQA 4, few blocks kept
        (torch.float32, 1, 6, 2, 700, 24, 16, 0.3, 400, True, {"blocks_per_program": 8, "chunk_blocks": 2}),
        (torch.float32, 1, 8, 1, 500, 16, 32, 0.4, None, False, {"blocks_per_program": 4, "chunk_blocks": 4}),
        (torch.float16, 1, 2, 1, 3000, 16, 64, 0.3, None, True, {"num_stages": 1}),
        (torch.float16, 1, 8, 2, 900, 64, 32, 0.2, 500, True, {"blocks_per_program": 8}),
    ],
)
def test_rank_decode_selects_the_reference_top_k_and_attends_like_the_reference(
    tuning, dtype, B, Hq, Hkv, S, D, bs, frac, q_start, causal, knobs
):
    tuning.update(knobs)
    q, k, v, _, scores, counts, idx, ref = case(
        B, Hq, Hkv, S, D, dtype, S, bs=bs, frac=frac, q_start=q_start, causal=causal
    )
    q_start = S - 1 if q_start is None else q_start
    out, got = tr.rank_decode(
        q, k, v, scores.clone(), int(counts[0]), block_size=bs, q_start=q_start, causal=causal
    )
    assert torch.equal(got.sort(-1).values.long(), idx.long())  # the same set as the reference top-k
    assert rel(out, ref) < TOL[dtype]
    assert int(ta._ticket_buffer(q.device, B * Hkv)[: B * Hkv].abs().sum()) == 0  # reset for replays


@pytest.mark.parametrize("W", [4, 16])
def test_rank_selection_breaks_ties_towards_the_lower_block(tuning, W):
    """Scores with many ties, forced (+inf) and hidden (-inf) blocks: rank < count is topk with
    ties to the lower index, whichever program holds the tied blocks."""
    tuning.update(blocks_per_program=W, chunk_blocks=2)
    B, Hkv, S, bs = 1, 3, 600, 16
    n = -(-S // bs)
    q, k, v = (torch.randn(B, Hkv, t, 16, device=DEVICE) for t in (1, S, S))
    g = torch.Generator().manual_seed(3)
    scores = (torch.randint(-3, 4, (B, Hkv, 1, n), generator=g).float() * 0.5).to(DEVICE)
    scores[..., 0] = float("inf")
    scores[..., n - 2 :] = float("inf")
    for count in (3, 7, 20):
        got = tr.rank_decode(q, k, v, scores, count, block_size=bs, q_start=S - 1)[1]
        assert torch.equal(got.sort(-1).values, ta.select_top_blocks(scores, count))


@pytest.mark.parametrize(
    "knobs", [{"blocks_per_program": 4, "chunk_blocks": 1}, {"blocks_per_program": 8, "chunk_blocks": 4}]
)
def test_device_length_rank_path_with_many_programs_per_row(tuning, knobs):
    tuning.update(knobs)
    B, Hkv, G, S, bs, D = 2, 2, 1, 300, 16, 16
    g = torch.Generator().manual_seed(11)
    q, k, v = (
        torch.randn(*s, generator=g).to(DEVICE) for s in ((B, Hkv * G, 1, D), (B, Hkv, S, D), (B, Hkv, S, D))
    )
    cfg = SparsityConfig(attention_sparse_ratio=0.5, attention_block_size=bs)
    starts = [0, 50]
    for length in (51, 160, 300):
        pooled = torch.zeros(B, Hkv, -(-S // bs), D, device=DEVICE)
        for b, s in enumerate(starts):
            pool_keys(k[b : b + 1, :, s : length - 1], bs, out=pooled[b : b + 1])
        out = sparse_attention(
            q, k, v, sparsity=cfg, kv_length=torch.tensor([length], device=DEVICE),
            kv_start=torch.tensor(starts, device=DEVICE), pooled_k=pooled, backend="triton",
        )  # fmt: skip
        want = rows_alone(q, k, v, cfg, starts, length)
        assert rel(out, want) < 1e-4, length


# ------------------------------------------------------------------ the compiled kernels (GPU)


@pytest.mark.skipif(GPU, reason="the compiled kernels on a GPU")
@pytest.mark.parametrize(
    ("S", "Hkv", "G", "keep"), [(32768, 8, 4, 32), (65536, 8, 4, 32), (8448, 32, 1, None)]
)
def test_gpu_decode_at_long_context_selects_and_attends_like_the_reference(S, Hkv, G, keep):
    """The issue-3 shapes (GQA 4, 32k / 64k keys, 32 blocks kept) and ds-7b's MHA, on the rank path."""
    g = torch.Generator().manual_seed(S)
    q, k, v = (
        torch.randn(*s, generator=g).to(torch.bfloat16).to(DEVICE)
        for s in ((1, Hkv * G, 1, 128), (1, Hkv, S, 128), (1, Hkv, S, 128))
    )
    n = -(-S // 64)
    counts = block_counts(
        (S - 1) // 64, 1, n, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=0.7, keep_blocks=keep
    )
    pooled = pool_keys(k, 64).to(torch.bfloat16)  # the decoder's cache dtype, on both sides
    geo = dict(block_size=64, q_start=S - 1, n_blocks=n, causal=True, sink_blocks=1, local_blocks=2)
    idx = select_blocks(block_scores(q, pooled, **geo), counts)
    sc = ta.decode_block_scores(q, pooled, **geo)
    out, got = tr.rank_decode(q, k, v, sc, int(counts[0]), block_size=64, q_start=S - 1)
    assert torch.equal(got.sort(-1).values.long(), idx.long())
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=64, q_start=S - 1)
    assert rel(out, ref) < 1e-2
    cfg = SparsityConfig(attention_keep_keys=None if keep is None else keep * 64, attention_sparse_ratio=0.3)
    assert rel(sparse_attention(q, k, v, sparsity=cfg, pooled_k=pooled), ref) < 1e-2


@pytest.mark.skipif(GPU, reason="CUDA-graph capture needs the compiled kernels on a GPU")
@pytest.mark.parametrize(
    ("G", "knobs"),
    [
        (4, {"path": "rank"}),
        (1, {"path": "rank"}),
        (4, {"path": "ticket"}),
        (4, {"path": "coop"}),  # one launch, a barrier per row (triton_coop.py)
        (4, {"path": "coop", "coop_launch": False, "coop_merge_unrolled": False}),
        (1, {"path": "coop"}),
    ],
)
def test_gpu_graph_replays_each_decode_path_at_every_length(tuning, G, knobs):
    """Scores kernel then the rank or the ticket attention kernel (two launches per step), or
    the coop kernel (one): tickets and barriers re-arm themselves between replays."""
    tuning.update(knobs)
    B, Hkv, S, bs, D = 2, 8 if G > 1 else 16, 16384, 64, 128
    g = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(*s, generator=g).to(torch.bfloat16).to(DEVICE)
        for s in ((B, Hkv * G, 1, D), (B, Hkv, S, D), (B, Hkv, S, D))
    )
    pooled = torch.zeros(B, Hkv, S // bs, D, dtype=torch.bfloat16, device=DEVICE)
    cfg = SparsityConfig(attention_sparse_ratio=0.7, attention_block_size=bs)
    starts = torch.tensor([0, 100], device=DEVICE)
    n = torch.tensor([300], device=DEVICE)

    def step():
        return sparse_attention(q, k, v, sparsity=cfg, kv_length=n, kv_start=starts, pooled_k=pooled)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for length in (300, 4095, 4096, 9000, 16384):
        for b, s in enumerate([0, 100]):
            pool_keys(k[b : b + 1, :, s : length - 1], bs, out=pooled[b : b + 1])
        n.fill_(length)
        for _ in range(2):  # twice: the tickets (and barriers) must be re-armed by the kernel itself
            graph.replay()
        want = rows_alone(q, k, v, cfg, [0, 100], length, pooled)  # the same bf16 pooled cache
        assert rel(out, want) < 1e-2, length


@pytest.mark.parametrize(
    "knobs",
    [
        {},  # the default split
        {"splits": 3},
        {"splits": 1, "num_stages": 3},
    ],
)
@pytest.mark.parametrize(("Hq", "Hkv", "frac"), [(4, 4, 0.7), (8, 2, 0.3)])
def test_split_attention_over_an_index_list_matches_the_reference(tuning, knobs, Hq, Hkv, frac):
    tuning.update(knobs)
    q, k, v, _, _, _, idx, ref = case(2, Hq, Hkv, 700, 32, torch.float32, 4, bs=16, frac=frac)
    out = ta.block_sparse_decode(q, k, v, idx.flip(-1), block_size=16, q_start=699)  # any order
    assert rel(out, ref) < 1e-4
    assert int(ta._ticket_buffer(q.device, 2 * Hkv)[: 2 * Hkv].abs().sum()) == 0
