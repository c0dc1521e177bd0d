"""The one-launch decode kernel (``triton_coop.coop_decode``) against the PyTorch reference.

P programs per row score their share of the key blocks, meet at the row's barrier, each finds
the row's exact top-k and attends to its share of the kept blocks. In the CPU interpreter the
same kernel runs as two launches (programs run one at a time there, so a barrier never opens);
the GPU test at the bottom runs the one-launch form; test_core_attention_rank.py replays it from
a CUDA graph at every length, next to the other decode paths.
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
tc = pytest.importorskip("ds_core.kernels.triton_coop")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GPU = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _triton_runs(needs_triton):
    """Every test here needs the kernels runnable (GPU or interpreter)."""


@pytest.fixture(autouse=True)
def _coop_path(tuning):
    """Every test here forces the coop path (conftest's ``tuning`` restores the knobs after)."""
    tuning["path"] = "coop"


def tickets_rearmed(device, rows):
    return all(
        int(ta._ticket_buffer(torch.device(device), rows, kind)[:rows].abs().sum()) == 0
        for kind in ("attn", "arrive")
    )


@pytest.mark.parametrize(
    ("dtype", "B", "Hq", "Hkv", "S", "D", "bs", "frac", "q_start", "causal", "programs"),
    [
        (torch.float32, 2, 8, 2, 900, 64, 32, 0.2, None, True, None),  # GQA 4, few blocks kept
        (torch.float16, 1, 8, 2, 900, 64, 32, 0.2, 500, True, 4),
        (torch.float32, 2, 4, 4, 1000, 32, 16, 0.7, None, True, 2),  # MHA, most blocks kept
        (torch.float32, 1, 6, 2, 700, 24, 16, 0.3, 400, True, 8),  # head dim not a power of two
        (torch.float32, 1, 8, 1, 500, 16, 32, 0.4, None, False, 3),  # not causal, 3 programs
        (
            torch.float16,
            1,
            2,
            1,
            3000,
            16,
            16,
            0.3,
            None,
            True,
            1,
        ),  # one program scores 188 blocks, 64 at a time
    ],
)
def test_coop_decode_selects_the_reference_top_k_and_attends_like_the_reference(
    tuning, rel_err, dtype, B, Hq, Hkv, S, D, bs, frac, q_start, causal, programs
):
    tuning["coop_programs"] = programs
    g = torch.Generator().manual_seed(S)
    q, k, v = (
        torch.randn(*s, generator=g).to(dtype).to(DEVICE)
        for s in ((B, Hq, 1, D), (B, Hkv, S, D), (B, Hkv, S, D))
    )
    q_start = S - 1 if q_start is None else q_start
    n = -(-S // bs)
    counts = block_counts(
        q_start // bs,
        1,
        n,
        causal=causal,
        sink_blocks=1,
        local_blocks=2,
        keep_fraction=frac,
        keep_blocks=None,
    )
    geo = dict(block_size=bs, q_start=q_start, n_blocks=n, causal=causal, sink_blocks=1, local_blocks=2)
    pooled = pool_keys(k, bs)
    idx = select_blocks(block_scores(q, pooled, **geo), counts)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=bs, q_start=q_start, causal=causal)
    out, got = tc.coop_decode(q, k, v, pooled, int(counts[0]), **geo)
    assert torch.equal(got.long(), idx.long())  # the reference top-k, ascending
    assert rel_err(out, ref) < TOL[dtype]
    assert tickets_rearmed(DEVICE, B * Hkv)
    # the public op takes the same path
    cfg = SparsityConfig(attention_sparse_ratio=1 - frac, attention_block_size=bs)
    if q_start == S - 1 and causal:
        want = sparse_attention(q, k, v, sparsity=cfg, pooled_k=pooled, backend="torch")
        assert (
            rel_err(sparse_attention(q, k, v, sparsity=cfg, pooled_k=pooled, backend="triton"), want)
            < TOL[dtype]
        )


@pytest.mark.parametrize(
    ("programs", "launch", "unrolled"), [(4, False, False), (8, None, True), (16, None, False)]
)
def test_coop_decode_through_the_public_knobs(tuning, rel_err, programs, launch, unrolled):
    """Programs per row, the launch attribute and the merge's unrolling are knobs: the same
    selection and output."""
    tuning.update(coop_programs=programs, coop_launch=launch, coop_merge_unrolled=unrolled)
    B, Hq, Hkv, S, D, bs = 2, 8, 2, 900, 64, 32
    g = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(*s, generator=g).to(DEVICE) for s in ((B, Hq, 1, D), (B, Hkv, S, D), (B, Hkv, S, D))
    )
    n = -(-S // bs)
    counts = block_counts(
        (S - 1) // bs, 1, n, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=0.3, keep_blocks=None
    )
    geo = dict(block_size=bs, q_start=S - 1, n_blocks=n, causal=True, sink_blocks=1, local_blocks=2)
    pooled = pool_keys(k, bs)
    idx = select_blocks(block_scores(q, pooled, **geo), counts)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=bs, q_start=S - 1)
    out, got = tc.coop_decode(q, k, v, pooled, int(counts[0]), **geo)
    assert torch.equal(got.long(), idx.long())
    assert rel_err(out, ref) < 1e-4
    assert tickets_rearmed(DEVICE, B * Hkv)


@pytest.mark.parametrize("programs", [1, 4, 16])
def test_coop_selection_breaks_ties_towards_the_lower_block(tuning, programs):
    """Pooled keys that repeat give tied scores: the kept set is topk with ties to the lower
    index, whichever program scored the tied blocks."""
    tuning["coop_programs"] = programs
    B, Hkv, S, bs, D = 1, 3, 600, 16, 16
    n = -(-S // bs)
    g = torch.Generator().manual_seed(3)
    q = torch.ones(B, Hkv, 1, D, device=DEVICE)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(DEVICE) for _ in range(2))
    pooled = (torch.randint(-3, 4, (B, Hkv, n, 1), generator=g).float() * 0.5).expand(B, Hkv, n, D)
    pooled = pooled.contiguous().to(DEVICE)
    geo = dict(block_size=bs, q_start=S - 1, n_blocks=n, causal=True, sink_blocks=1, local_blocks=2)
    scores = ta.decode_block_scores(q, pooled, **geo)
    for count in (3, 7, 20):
        got = tc.coop_decode(q, k, v, pooled, count, **geo)[1]
        assert torch.equal(got, ta.select_top_blocks(scores, count)), count


@pytest.mark.parametrize("programs", [None, 2, 8])
def test_device_length_coop_path_matches_each_row_alone(tuning, rel_err, programs):
    """Left-padded rows, lengths on the device, the pooled cache one block behind (the kernel
    adds the latest complete block's mean itself, as the two-launch path does)."""
    tuning["coop_programs"] = programs
    B, Hkv, G, S, bs, D = 2, 2, 4, 300, 16, 16
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
        want = []
        for b, s in enumerate(starts):
            kb, vb = k[b : b + 1, :, s:length], v[b : b + 1, :, s:length]
            want.append(sparse_attention(q[b : b + 1], kb, vb, sparsity=cfg, backend="torch"))
        assert rel_err(out, torch.cat(want)) < 1e-4, length
        assert tickets_rearmed(DEVICE, B * Hkv)


def test_programs_per_row_fill_the_sms_and_respect_the_override(tuning):
    cpu = torch.device("cpu")  # the interpreter counts 4 "SMs"
    assert tc.coop_programs(1, 100, cpu) == 4
    assert tc.coop_programs(2, 100, cpu) == 2
    assert tc.coop_programs(8, 100, cpu) == 1
    assert tc.coop_programs(1, 2, cpu) == 2  # never more programs than blocks
    tuning["coop_programs"] = 3
    assert tc.coop_programs(8, 100, cpu) == 3


# ------------------------------------------------------------------ the compiled kernels (GPU)


@pytest.mark.skipif(GPU, reason="the compiled kernels on a GPU")
@pytest.mark.parametrize(
    ("S", "Hkv", "G", "keep"), [(32768, 8, 4, 32), (65536, 8, 4, 32), (8448, 32, 1, None)]
)
def test_gpu_coop_decode_at_long_context_selects_and_attends_like_the_reference(
    tuning, rel_err, S, Hkv, G, keep
):
    """The issue-3 shapes (GQA 4, 32k / 64k keys, 32 blocks kept) and ds-7b's MHA, one launch."""
    g = torch.Generator().manual_seed(S)
    q, k, v = (
        torch.randn(*s, generator=g).to(torch.bfloat16).to(DEVICE)
        for s in ((1, Hkv * G, 1, 128), (1, Hkv, S, 128), (1, Hkv, S, 128))
    )
    n = -(-S // 64)
    counts = block_counts(
        (S - 1) // 64, 1, n, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=0.7, keep_blocks=keep
    )
    pooled = pool_keys(k, 64).to(torch.bfloat16)
    geo = dict(block_size=64, q_start=S - 1, n_blocks=n, causal=True, sink_blocks=1, local_blocks=2)
    idx = select_blocks(block_scores(q, pooled, **geo), counts)
    out, got = tc.coop_decode(q, k, v, pooled, int(counts[0]), **geo)
    assert torch.equal(got.long(), idx.long())
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=64, q_start=S - 1)
    assert rel_err(out, ref) < 1e-2
    assert tickets_rearmed(DEVICE, Hkv)


def test_top_k_bisection_at_the_infinite_edges():
    """``_top_keep`` (shared by every selection kernel) searches between the finite scores: counts
    inside the forced (+inf) blocks, across the finite ones and into the hidden (-inf) ones."""
    g = torch.Generator().manual_seed(9)
    row = torch.randn(2, 40, generator=g)
    row[:, [0, 7, 8]] = float("inf")
    row[:, 30:] = float("-inf")
    row[1, 10:20] = 0.25  # ties among the finite scores
    row = row.to(DEVICE)
    for count in (1, 3, 4, 15, 27, 30, 33, 40):
        # descending, ties (the infinities too) to the lower index
        want = torch.sort(torch.sort(-row.cpu(), stable=True).indices[:, :count]).values
        assert torch.equal(ta.select_top_blocks(row, count).long().cpu(), want), count
