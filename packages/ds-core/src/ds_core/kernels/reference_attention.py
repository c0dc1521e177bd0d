"""Plain-PyTorch definition of adaptive block-sparse attention.

This file is the living definition of what ``ds_core.sparse_attention`` computes; the gather
path at the bottom (the CPU fast path) and the Triton kernels are checked against it.

Keys are cut into blocks of ``block_size`` positions (block ``j`` holds keys ``[j*bs, (j+1)*bs)``,
the last block may be partial). Queries are grouped by the same blocking of their absolute
positions, so query block ``a`` and key block ``a`` cover the same positions (the "diagonal").
For each query block and each KV head (the selection is shared by the query heads of a GQA group):

1. visible blocks: ``j <= a`` when causal, every block otherwise;
2. forced blocks: the first ``sink_blocks`` (attention sinks) and the local window
   ``a - local_blocks < j <= a``, at least the diagonal block itself (a query always sees itself);
3. budget: ``ceil(keep_fraction * n_visible)`` blocks, or ``ceil(keep_keys / bs)`` when an explicit
   key budget is given; never fewer than the forced blocks, never more than the visible ones;
4. the rest of the budget goes to the visible blocks with the highest score
   ``sum_{h in group} mean_{t in query block}(q[h, t]) . mean(k[block j])``;
5. attention is ordinary (causal) softmax attention restricted to the keys of the kept blocks.

Selection is a pure function of (masked scores, counts); the attention functions take the
selection as input, so fast backends can be compared on identical selections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-9  # (1 - 0.7) * 10 == 3.0000000000000004 must still keep 3 blocks, not 4


def pool_keys(k: Tensor, block_size: int, *, out: Tensor | None = None, start: int = 0) -> Tensor:
    """Mean of the keys of each block: (B, Hkv, S, D) -> (B, Hkv, ceil(S / bs), D), float32.

    A partial last block is the mean of its valid keys. With ``out`` (a preallocated pooled-key
    cache, any float dtype, at least ceil(S / bs) rows) only the blocks holding positions
    ``>= start`` are recomputed and written, so a decoder refreshes one block per step.
    """
    B, H, S, D = k.shape
    nblk = -(-S // block_size)
    first = start // block_size
    kk = k[:, :, first * block_size :]
    pad = (nblk - first) * block_size - kk.shape[2]
    if pad:
        kk = F.pad(kk, (0, 0, 0, pad))
    kk = kk.reshape(B, H, nblk - first, block_size, D)  # (B, H, n, bs, D)
    pooled = kk.sum(dim=3, dtype=torch.float32) / block_size  # (B, H, n, D)
    if pad:  # the partial last block: mean over its valid keys only
        pooled[:, :, -1] *= block_size / (block_size - pad)
    if out is None:
        return pooled
    out[:, :, first:nblk] = pooled.to(out.dtype)
    return out


def block_counts(
    first_qblock: int,
    n_qblocks: int,
    n_blocks: int,
    *,
    causal: bool,
    sink_blocks: int,
    local_blocks: int,
    keep_fraction: float,
    keep_blocks: int | None,
) -> Tensor:
    """Number of kept key blocks for each query block: (n_qblocks,) int64 (on CPU)."""
    a = torch.arange(first_qblock, first_qblock + n_qblocks, dtype=torch.int64)
    n_visible = a + 1 if causal else torch.full_like(a, n_blocks)
    # forced = sinks ∪ local window, both clipped to the visible blocks
    lo = (a - max(1, local_blocks) + 1).clamp(min=0)
    hi = a.clamp(max=n_blocks - 1)
    n_local = (hi - lo + 1).clamp(min=0)
    n_sink = torch.minimum(torch.full_like(a, sink_blocks), n_visible)
    overlap = (torch.minimum(n_sink, hi + 1) - lo).clamp(min=0)
    n_forced = n_sink + n_local - overlap
    if keep_blocks is not None:
        budget = torch.full_like(a, keep_blocks)
    else:
        budget = torch.ceil(n_visible.double() * keep_fraction - _EPS).long()
    return torch.minimum(torch.maximum(budget, n_forced), n_visible)


def block_scores(
    q: Tensor,
    pooled_k: Tensor,
    *,
    block_size: int,
    q_start: int,
    n_blocks: int,
    causal: bool,
    sink_blocks: int,
    local_blocks: int,
) -> Tensor:
    """Masked block scores (B, Hkv, n_qblocks, n_blocks) float32: +inf forced, -inf invisible.

    q: (B, Hq, Tq, D); pooled_k: (B, Hkv, >= n_blocks', D) where rows of blocks that are always
    forced (a causal partial last block) may be missing.
    """
    B, Hq, Tq, D = q.shape
    Hkv = pooled_k.shape[1]
    first = q_start // block_size
    nqb = (q_start + Tq - 1) // block_size - first + 1
    # mean query of each query block, summed over the heads of the GQA group
    lead = q_start - first * block_size
    tail = nqb * block_size - lead - Tq
    qq = F.pad(q, (0, 0, lead, tail)) if lead or tail else q
    qq = qq.reshape(B * Hq * nqb, block_size, D).sum(dim=1, dtype=torch.float32)  # one pass over q
    qq = qq.view(B, Hkv, Hq // Hkv, nqb, D).sum(dim=2)  # (B, Hkv, nqb, D)
    pos = torch.arange(first * block_size, (first + nqb) * block_size, device=q.device)
    n_q = ((pos >= q_start) & (pos < q_start + Tq)).view(nqb, block_size).sum(1)
    qq = qq / n_q[:, None]
    n_pooled = min(pooled_k.shape[2], n_blocks)
    scores = torch.zeros(B, Hkv, nqb, n_blocks, device=q.device)
    scores[..., :n_pooled] = qq @ pooled_k[:, :, :n_pooled].float().transpose(-1, -2)
    a = torch.arange(first, first + nqb, device=q.device)[:, None]
    j = torch.arange(n_blocks, device=q.device)[None, :]
    forced = (j < sink_blocks) | ((j <= a) & (j > a - max(1, local_blocks)))
    visible = (j <= a) if causal else torch.ones_like(forced)
    scores = scores.masked_fill(forced & visible, math.inf)
    return scores.masked_fill(~visible, -math.inf)


def select_blocks(scores: Tensor, counts: Tensor) -> Tensor:
    """Kept blocks (B, Hkv, n_qblocks, max(counts)) int32, the first counts[i] of row i valid, ascending.

    The padding entries are 0 (a valid block index, so gathers stay in bounds); callers mask them
    with ``counts``.
    """
    kmax = int(counts.max())
    top = scores.topk(kmax, dim=-1, sorted=True).indices  # forced (+inf) first, then best scores
    keep = torch.arange(kmax, device=scores.device) < counts.to(scores.device)[:, None]
    top = torch.where(keep, top, scores.shape[-1]).sort(dim=-1).values
    return torch.where(keep, top, 0).to(torch.int32)


def _key_mask(
    indices: Tensor, counts: Tensor, *, block_size: int, q_start: int, Tq: int, S: int, causal: bool
) -> Tensor:
    """(B, Hkv, Tq, S) bool: which keys each query attends to."""
    B, Hkv, nqb, kmax = indices.shape
    nblk = -(-S // block_size)
    first = q_start // block_size
    keep = torch.arange(kmax, device=indices.device) < counts.to(indices.device)[:, None]
    chosen = torch.zeros(B, Hkv, nqb, nblk + 1, dtype=torch.bool, device=indices.device)
    idx = torch.where(keep, indices.long(), nblk)
    chosen.scatter_(-1, idx, True)
    chosen = chosen[..., :nblk].repeat_interleave(block_size, dim=-1)[..., :S]  # (B, Hkv, nqb, S)
    qpos = torch.arange(q_start, q_start + Tq, device=indices.device)
    mask = chosen[:, :, qpos // block_size - first]  # (B, Hkv, Tq, S)
    if causal:
        mask = mask & (torch.arange(S, device=indices.device)[None, :] <= qpos[:, None])
    return mask


def reference_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    counts: Tensor,
    *,
    block_size: int,
    q_start: int,
    causal: bool = True,
) -> Tensor:
    """Softmax attention restricted to the kept blocks, as a dense masked computation in float32."""
    _, Hq, Tq, D = q.shape
    S, G = k.shape[2], Hq // k.shape[1]
    mask = _key_mask(indices, counts, block_size=block_size, q_start=q_start, Tq=Tq, S=S, causal=causal)
    kk = k.float().repeat_interleave(G, dim=1)
    vv = v.float().repeat_interleave(G, dim=1)
    att = (q.float() @ kk.transpose(-1, -2)) / math.sqrt(D)  # (B, Hq, Tq, S)
    att = att.masked_fill(~mask.repeat_interleave(G, dim=1), -math.inf)
    return (att.softmax(dim=-1) @ vv).to(q.dtype)


def gather_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    counts: Tensor,
    *,
    block_size: int,
    q_start: int,
    causal: bool = True,
    max_chunk_bytes: int = 1 << 26,
) -> Tensor:
    """CPU fast path: copy only the kept K/V blocks, then attend over them.

    Work and memory traffic scale with the kept keys instead of S. The queries of one query
    block and one GQA group are the rows of one small attention problem; query blocks are
    processed in chunks so the gathered K/V stay under ``max_chunk_bytes``. Takes a selection
    from ``select_blocks`` (ascending, the diagonal block kept), so under causal masking only
    the last kept block of each list can reach past a query.
    """
    B, Hq, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, bs = Hq // Hkv, block_size
    nqb, kmax = indices.shape[2], indices.shape[3]
    nblk = -(-S // bs)
    first = q_start // bs
    pad_s = nblk * bs - S
    if pad_s:  # only a partial last block costs a copy of K and V
        k, v = F.pad(k, (0, 0, 0, pad_s)), F.pad(v, (0, 0, 0, pad_s))
    kb = k.reshape(B, Hkv, nblk, bs, D)
    vb = v.reshape(B, Hkv, nblk, bs, D)
    if nqb == 1:  # decode and short chunks: no padding of the queries to a whole block
        L, lead = Tq, 0
        qb = q.reshape(B, Hkv, G, 1, Tq, D)
        qpos = torch.arange(q_start, q_start + Tq, device=q.device)[None]  # (1, L)
    else:
        L, lead = bs, q_start - first * bs
        qb = F.pad(q, (0, 0, lead, nqb * bs - lead - Tq)).reshape(B, Hkv, G, nqb, bs, D)
        qpos = torch.arange(first * bs, (first + nqb) * bs, device=q.device).view(nqb, bs)
    qb = qb.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, nqb, G * L, D) / math.sqrt(D)  # (B, Hkv, nqb, R, D)
    qpos = qpos[:, None, :].expand(nqb, G, L).reshape(nqb, G * L)  # (nqb, R): position of each row
    out = torch.empty(B, Hkv, nqb, G * L, D, dtype=q.dtype, device=q.device)
    counts = counts.to(q.device)
    offs = torch.arange(bs, device=q.device)
    bi = torch.arange(B, device=q.device)[:, None, None, None]
    hi = torch.arange(Hkv, device=q.device)[None, :, None, None]
    step = max(1, max_chunk_bytes // max(1, 2 * B * Hkv * kmax * bs * D * k.element_size()))
    for c0 in range(0, nqb, step):
        c1 = min(nqb, c0 + step)
        c = c1 - c0
        kmax = int(counts[c0:c1].max())  # neighbouring query blocks keep similar counts: little padding
        idx = indices[:, :, c0:c1, :kmax].long()  # (B, Hkv, c, kmax)
        slot = torch.arange(kmax, device=q.device)
        ks = kb[bi, hi, idx].reshape(B, Hkv, c, kmax * bs, D)  # (B, Hkv, c, K, D)
        vs = vb[bi, hi, idx].reshape(B, Hkv, c, kmax * bs, D)
        att = (qb[:, :, c0:c1] @ ks.transpose(-1, -2)).float()  # (B, Hkv, c, R, K), softmax in fp32
        kpos = (idx * bs)[..., None] + offs  # (B, Hkv, c, kmax, bs)
        valid = (slot < counts[c0:c1, None])[..., None] & (kpos < S)
        att.masked_fill_(~valid.reshape(B, Hkv, c, 1, kmax * bs), -math.inf)
        if causal:  # the diagonal block, last in each list, is the only one reaching past a row
            last = (slot == counts[c0:c1, None] - 1)[:, None, :, None]  # (c, 1, kmax, 1)
            diag = (torch.arange(first + c0, first + c1, device=q.device) * bs)[:, None, None, None] + offs
            late = last & (diag > qpos[c0:c1, :, None, None])  # (c, R, kmax, bs)
            att.masked_fill_(late.reshape(c, G * L, kmax * bs), -math.inf)
        out[:, :, c0:c1] = (att.softmax(dim=-1) @ vs.float()).to(q.dtype)
    out = out.view(B, Hkv, nqb, G, L, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, nqb * L, D)
    return out[:, :, lead : lead + Tq]


# --------------------------------------------------------------------------------------------
# decode with the valid length on the device (a fixed-shape, captured decode step)
# --------------------------------------------------------------------------------------------
# Row b of a fixed-size cache (B, Hkv, S_max, D) holds its keys in slots [start[b], length[b]);
# the query is the token in slot length[b] - 1. The semantics are those of the functions above
# applied to k[b, :, start[b]:length[b]]: blocks are counted from the row's first key, so a
# left-padded row selects exactly as it would unpadded. The pooled-key cache of such a row is
# laid out the same way (its block j is the mean of slots start + j*bs .. start + (j+1)*bs - 1).


def decode_count_table(
    n_blocks: int, *, sink_blocks: int, local_blocks: int, keep_fraction: float, keep_blocks: int | None
) -> Tensor:
    """Kept blocks of a decode query that sees n visible blocks, for n = 0 .. n_blocks: (n_blocks + 1,) int64.

    The query sits in the last visible block, so its count depends on n only; indexing this
    table on the device replaces ``block_counts`` where the length is a tensor (exact: the
    rounding is done here, in float64, once).
    """
    counts = block_counts(
        0,
        n_blocks,
        n_blocks,
        causal=True,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        keep_fraction=keep_fraction,
        keep_blocks=keep_blocks,
    )
    return torch.cat([counts.new_zeros(1), counts])


def pool_keys_from(k: Tensor, block_size: int, start: Tensor, length: Tensor, n_rows: int) -> Tensor:
    """Pooled keys (B, Hkv, n_rows, D) float32 of each row's valid slots [start, length), row-relative.

    A partial block is the mean of its valid keys; blocks past the valid keys are 0.
    """
    B, H, S, D = k.shape
    rel = torch.arange(n_rows * block_size, device=k.device)  # (R,)
    slots = (start[:, None] + rel).clamp(max=S - 1)  # (B, R)
    kk = k.gather(2, slots[:, None, :, None].expand(B, H, rel.numel(), D)).float()
    valid = (rel[None, :] < (length - start)[:, None]).view(B, 1, n_rows, block_size, 1)
    kk = kk.view(B, H, n_rows, block_size, D) * valid
    return kk.sum(dim=3) / valid.sum(dim=3).clamp(min=1)


def refresh_last_pooled_block(
    k: Tensor, pooled: Tensor, block_size: int, start: Tensor, length: Tensor
) -> None:
    """Rewrite, in place, the pooled row of each row's latest complete block (``n // bs - 1``).

    Called at every decode step (the length grows by one), this keeps a pooled-key cache exact:
    a block's mean is written once all its keys are in the cache. Rows with no complete block
    keep their values. Device ops only (no host sync), so it runs inside a captured graph.
    """
    B, H, S, D = k.shape
    c = (length - start) // block_size - 1  # (B,)
    row = c.clamp(min=0)
    slots = ((start + row * block_size)[:, None] + torch.arange(block_size, device=k.device)).clamp(max=S - 1)
    kb = k.gather(2, slots[:, None, :, None].expand(B, H, block_size, D))  # (B, H, bs, D)
    mean = (kb.sum(dim=2, dtype=torch.float32) / block_size).to(pooled.dtype)  # (B, H, D)
    where = row.view(B, 1, 1, 1).expand(B, H, 1, D)
    old = pooled.gather(2, where)[:, :, 0]
    pooled.scatter_(2, where, torch.where((c >= 0).view(B, 1, 1), mean, old)[:, :, None])


def decode_scores_dynamic(
    q: Tensor,
    pooled_k: Tensor,
    *,
    block_size: int,
    start: Tensor,
    length: Tensor,
    n_blocks: int,
    sink_blocks: int,
    local_blocks: int,
) -> Tensor:
    """Masked block scores (B, Hkv, n_blocks) float32 of one decode query per row (+inf forced, -inf invisible)."""
    B, Hq, _, D = q.shape
    Hkv = pooled_k.shape[1]
    qsum = q.reshape(B, Hkv, Hq // Hkv, D).sum(dim=2, dtype=torch.float32)  # (B, Hkv, D)
    n_pooled = min(pooled_k.shape[2], n_blocks)
    scores = torch.zeros(B, Hkv, n_blocks, device=q.device)
    scores[..., :n_pooled] = (qsum[:, :, None, :] @ pooled_k[:, :, :n_pooled].float().transpose(-1, -2))[
        :, :, 0
    ]
    qblock = (length - start - 1) // block_size  # (B,): the query's block, row-relative
    j = torch.arange(n_blocks, device=q.device)[None, :]
    visible = j <= qblock[:, None]  # (B, n_blocks)
    forced = (j < sink_blocks) | (visible & (j > qblock[:, None] - max(1, local_blocks)))
    scores = scores.masked_fill((forced & visible)[:, None], math.inf)
    return scores.masked_fill(~visible[:, None], -math.inf)


def dynamic_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    start: Tensor,
    length: Tensor,
    pooled_k: Tensor,
    count_table: Tensor,
    max_count: int,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
) -> Tensor:
    """One decode query per row over a fixed-size cache, valid length on the device -> (B, Hq, 1, D).

    ``start``, ``length`` (B,) int64; ``count_table`` from ``decode_count_table`` (on q's device),
    ``max_count`` its largest entry (a host int: the static width of the selection). Refreshes
    the latest complete block of ``pooled_k`` first (``refresh_last_pooled_block``). The CPU
    path: scores, a top-``max_count`` masked by each row's count, a gather of the kept blocks.
    """
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, bs = Hq // Hkv, block_size
    n_blocks = -(-S // bs)
    refresh_last_pooled_block(k, pooled_k, bs, start, length)
    scores = decode_scores_dynamic(
        q,
        pooled_k,
        block_size=bs,
        start=start,
        length=length,
        n_blocks=n_blocks,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
    )
    n = length - start  # (B,) valid keys
    count = count_table[(n - 1) // bs + 1]  # (B,)
    top = scores.topk(max_count, dim=-1).indices  # (B, Hkv, kmax): forced first, then best
    keep = torch.arange(max_count, device=q.device) < count[:, None, None]
    kpos = top[..., None] * bs + torch.arange(bs, device=q.device)  # (B, Hkv, kmax, bs) row-relative
    valid = (keep[..., None] & (kpos < n[:, None, None, None])).reshape(B, Hkv, 1, max_count * bs)
    slots = (start[:, None, None, None] + kpos).clamp(max=S - 1).reshape(B, Hkv, max_count * bs, 1)
    ks = k.gather(2, slots.expand(-1, -1, -1, D)).float()  # (B, Hkv, K, D)
    vs = v.gather(2, slots.expand(-1, -1, -1, D)).float()
    att = (q.reshape(B, Hkv, G, D).float() @ ks.transpose(-1, -2)) / math.sqrt(D)  # (B, Hkv, G, K)
    att = att.masked_fill(~valid, -math.inf)
    out = att.softmax(dim=-1) @ vs  # (B, Hkv, G, D)
    return out.reshape(B, Hq, 1, D).to(q.dtype)
