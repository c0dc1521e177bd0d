"""Adaptive sparse attention: each query block attends to a few key blocks, not to all of them.

The kept key blocks are the attention sinks (the first ``sink_blocks``), a local window (the
last ``local_blocks`` blocks up to the query's own, which is always kept) and the key blocks that
score highest against the query by a cheap block score - the query (averaged over its query
block, summed over the query heads of its GQA group) dotted with the mean key of the block. One
selection is shared by all heads of a GQA group, so a kernel reads each kept K/V block once per
group. How many blocks are kept: ``ceil((1 - attention_sparse_ratio) * visible blocks)`` or, with
``attention_keep_keys``, ``ceil(attention_keep_keys / attention_block_size)``. Ratio 0 (and no key
budget) is exact dense attention through ``F.scaled_dot_product_attention``.

Semantics live in ``kernels/reference_attention.py``; this file validates inputs and dispatches:
``"triton"`` runs ``kernels/triton_attention.py`` (GPU, or CPU under ``TRITON_INTERPRET=1``),
``"torch"`` gathers the kept K/V blocks and runs SDPA on them (the CPU fast path).

Decoding with a KV cache: the block score needs the mean key of every complete block. Recomputing
it each step would read the whole K cache, which is half of what dense attention reads, so keep a
pooled-key cache next to the KV cache and pass it as ``pooled_k``::

    pooled = torch.zeros(B, Hkv, max_len // block_size, D, device=..., dtype=k_cache.dtype)
    pool_keys(k_cache[:, :, :S], block_size, out=pooled, start=S - n_new)  # after appending keys
    out = sparse_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], sparsity=cfg, pooled_k=pooled)

A captured (CUDA graph) or compiled decode step cannot slice the cache to a length that changes
every step. For one-token decode, pass the whole fixed-size cache and the valid length as a
device tensor instead (``kv_length``; ``kv_start`` for left-padded rows): block scores, the
sink / window / top-k selection and the attention bounds then read the length on the device,
and the op refreshes the pooled row of the latest complete block itself, so the pooled-key cache
stays exact as the length grows by one per step::

    out = sparse_attention(q, k_cache, v_cache, sparsity=cfg, pooled_k=pooled,
                           kv_length=input_pos + 1, kv_start=pad)  # (1,) / (B,) int64 tensors
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ds_core import backends
from ds_core.config import DsCoreError, SparsityConfig
from ds_core.kernels.reference_attention import (
    block_counts,
    block_scores,
    decode_count_table,
    dynamic_decode_attention,
    gather_sparse_attention,
    pool_keys,
    pool_keys_from,
    refresh_last_pooled_block,
    select_blocks,
)

__all__ = ["SparseAttention", "dense_decode_attention", "pool_keys", "sparse_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, q_start: int | None, causal: bool) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise DsCoreError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, Hq, Tq, D)" if name == "q" else "(B, Hkv, S, D)"
            raise DsCoreError(f"{name}: expected a 4-d tensor {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise DsCoreError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
        if t.numel() == 0:
            raise DsCoreError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise DsCoreError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
        if t.device != q.device:
            raise DsCoreError(f"{name}: expected device {q.device} like q, got {t.device}")
    if v.shape != k.shape:
        raise DsCoreError(f"v: expected shape {tuple(k.shape)} like k, got {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise DsCoreError(f"k: expected batch {B} and head dim {D} like q, got shape {tuple(k.shape)}")
    if Hq % k.shape[1]:
        raise DsCoreError(f"k: {k.shape[1]} KV heads must divide the {Hq} query heads of q (GQA)")
    S = k.shape[2]
    if Tq > S:
        raise DsCoreError(f"q: {Tq} queries cannot be among the {S} keys of k (Tq must be <= S)")
    if q_start is None:
        q_start = S - Tq
    if isinstance(q_start, bool) or not isinstance(q_start, int) or not 0 <= q_start <= S - Tq:
        raise DsCoreError(
            f"q_start: expected an integer in [0, {S - Tq}] (the {Tq} queries must lie among the {S} keys), "
            f"got {q_start!r}"
        )
    if not isinstance(causal, bool):
        raise DsCoreError(f"causal: expected True or False, got {causal!r}")
    return q_start


def _dense(q: Tensor, k: Tensor, v: Tensor, q_start: int, causal: bool) -> Tensor:
    Tq, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or q_start + Tq == S == q_start + 1:  # last token of a decode step sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if q_start == 0 and Tq == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    qpos = torch.arange(q_start, q_start + Tq, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= qpos[:, None]  # (Tq, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _check_lengths(q: Tensor, k: Tensor, kv_length, kv_start, q_start) -> tuple[Tensor, Tensor]:
    """Validate the device-side valid range; return (start, length) as (B,) int64 (no host sync)."""
    B = q.shape[0]
    if q.shape[2] != 1:
        raise DsCoreError(
            f"kv_length: a device-side length serves one-token decode, q has {q.shape[2]} queries"
        )
    if q_start is not None:
        raise DsCoreError("q_start: not used with kv_length (the query is the token in slot kv_length - 1)")
    for name, t in (("kv_length", kv_length), ("kv_start", kv_start)):
        if t is None and name == "kv_start":
            continue
        if not isinstance(t, Tensor):
            raise DsCoreError(f"{name}: expected an integer torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise DsCoreError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise DsCoreError(f"{name}: expected device {q.device} like q, got {t.device}")
        if t.dim() > 1 or t.numel() not in (1, B):
            raise DsCoreError(f"{name}: expected shape (), (1,) or ({B},), got {tuple(t.shape)}")
    length = kv_length.reshape(-1).long().expand(B)  # the kernels read it with its stride (0 or 1)
    if kv_start is None:
        return torch.zeros(B, dtype=torch.long, device=q.device), length
    start = kv_start.reshape(-1).long()
    return (start if start.numel() == B else start.expand(B).contiguous()), length


_tables: dict[tuple, tuple[Tensor, int]] = {}


def _count_table(cfg: SparsityConfig, n_blocks: int, device: torch.device) -> tuple[Tensor, int]:
    """decode_count_table for this config on `device`, and its largest entry; cached (built once,
    before a CUDA graph is captured, so replays never copy from the host)."""
    keep = cfg.attention_keep_keys
    bs = cfg.attention_block_size
    key = (device, n_blocks, bs, cfg.sink_blocks, cfg.local_blocks, cfg.attention_sparse_ratio, keep)
    if key not in _tables:
        table = decode_count_table(
            n_blocks,
            sink_blocks=cfg.sink_blocks,
            local_blocks=max(1, cfg.local_blocks),
            keep_fraction=1.0 - cfg.attention_sparse_ratio,
            keep_blocks=None if keep is None else -(-keep // bs),
        )
        dense = bool((table == torch.arange(n_blocks + 1)).all())  # the budget keeps every block
        _tables[key] = (table.to(device), -1 if dense else int(table.max()))
    return _tables[key]


def dense_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_length: Tensor,
    kv_start: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Dense attention of one query token per row over a fixed-size cache: (B, Hq, 1, D) -> (B, Hq, 1, D).

    k, v (B, Hkv, S, D) are the whole cache; row b attends to slots ``kv_start[b] .. kv_length[b]
    - 1`` (integer tensors of shape (), (1,) or (B,); kv_start defaults to 0), which must satisfy
    0 <= kv_start < kv_length <= S (not checked: that would sync). The same as
    ``sparse_attention(..., kv_length=, kv_start=)`` at ratio 0, but traceable by torch.compile
    without a graph break. Triton (``kernels/triton_decode_dense.py``) reads only the valid
    slots; the torch path is SDPA with a mask over all of them.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise DsCoreError(f"q: expected a (B, Hq, 1, D) tensor (one query token), got shape {tuple(q.shape)}")
    B, Hq, _, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[3] != D or Hq % t.shape[1] or t.shape != k.shape:
            raise DsCoreError(
                f"{name}: expected ({B}, Hkv, S, {D}) with Hkv dividing {Hq}, got {tuple(t.shape)}"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise DsCoreError(f"{name}: expected {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
    start, length = _check_lengths(q, k, kv_length, kv_start, None)  # (B,) each, as sparse_attention
    return _dense_decode(q, k, v, start, length, backend)


def _dense_decode(q: Tensor, k: Tensor, v: Tensor, start: Tensor, length: Tensor, backend: str) -> Tensor:
    """dense_decode_attention on checked inputs; start, length (B,) int tensors."""
    Hq, D = q.shape[1], q.shape[3]
    if torch.compiler.is_compiling():  # the backend switch reads the environment: go by the device
        name = "triton" if q.is_cuda else "torch"
    else:
        name = backends.resolve(backend, q.device)
    if name == "triton" and D <= 256 and Hq // k.shape[1] <= 64:
        from ds_core.kernels import triton_decode_dense  # noqa: F401  registers torch.ops.ds_core.dense_decode_attention

        q3 = q[:, :, 0] if q.stride(3) == 1 else q[:, :, 0].contiguous()  # (B, Hq, D)
        if k.stride(3) != 1 or v.stride(3) != 1:
            k, v = k.contiguous(), v.contiguous()
        out = torch.ops.ds_core.dense_decode_attention(q3, k, v, start, length, D**-0.5)
        return out[:, :, None]  # (B, Hq, 1, D)
    slot = torch.arange(k.shape[2], device=q.device)
    mask = (slot >= start[:, None]) & (slot < length[:, None])  # (B, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None], enable_gqa=k.shape[1] != Hq)


@torch.compiler.disable
def _dynamic_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cfg: SparsityConfig,
    start: Tensor,
    length: Tensor,
    pooled_k: Tensor | None,
    backend: str,
) -> Tensor:
    # Never traced by torch.compile (a graph break; inside a captured CUDA graph it costs nothing):
    # the Triton launches update the pooled-key cache and atomic tickets in place.
    B, Hkv, S, D = k.shape
    bs = cfg.attention_block_size
    n_blocks = -(-S // bs)
    table, max_count = _count_table(cfg, n_blocks, q.device)
    if (cfg.attention_sparse_ratio == 0.0 and cfg.attention_keep_keys is None) or max_count < 0:
        backends.resolve(backend, q.device)
        if isinstance(pooled_k, Tensor) and pooled_k.dim() == 4 and pooled_k.shape[2] >= S // bs:
            refresh_last_pooled_block(k, pooled_k, bs, start, length)  # the cache stays exact
        return _dense_decode(q, k, v, start, length, backend)
    if pooled_k is None:  # no cache kept by the caller: pool every valid block (reads all of K)
        pooled_k = pool_keys_from(k, bs, start, length, n_blocks).to(k.dtype)
    else:
        _check_pooled(pooled_k, (B, Hkv, S // bs, D), q.device)
    geometry = dict(
        start=start,
        length=length,
        pooled_k=pooled_k,
        count_table=table,
        max_count=max_count,
        block_size=bs,
        sink_blocks=cfg.sink_blocks,
        local_blocks=max(1, cfg.local_blocks),
    )
    if _backend(backend, q, k, bs, n_blocks) == "triton":
        from ds_core.kernels.triton_attention import dynamic_decode

        return dynamic_decode(q, k, v, **geometry)
    return dynamic_decode_attention(q, k, v, **geometry)


def _check_pooled(pooled_k, shape: tuple[int, int, int, int], device: torch.device) -> None:
    """pooled_k must be (B, Hkv, >= n, D) on q's device; shape = (B, Hkv, n, D)."""
    B, Hkv, need, D = shape
    if (
        not isinstance(pooled_k, Tensor)
        or pooled_k.dim() != 4
        or (pooled_k.shape[0], pooled_k.shape[1], pooled_k.shape[3]) != (B, Hkv, D)
        or pooled_k.shape[2] < need
    ):
        got = tuple(pooled_k.shape) if isinstance(pooled_k, Tensor) else type(pooled_k).__name__
        raise DsCoreError(f"pooled_k: expected shape ({B}, {Hkv}, >={need}, {D}), got {got}")
    if pooled_k.device != device:
        raise DsCoreError(f"pooled_k: expected device {device} like q, got {pooled_k.device}")


def _backend(backend: str, q: Tensor, k: Tensor, block_size: int, n_blocks: int | None = None) -> str:
    """The backend to run: "triton" unless the kernels cannot take the problem, which falls back
    to "torch" (an error when triton was asked for explicitly). n_blocks: the row's key blocks,
    for the kernels that select over a whole row at once."""
    name = backends.resolve(backend, q.device)
    if name != "triton":
        return name
    why = _triton_unsupported(q, k, block_size)
    if why is None and n_blocks is not None and n_blocks > _max_select_blocks():
        why = f"at most {_max_select_blocks()} key blocks for the Triton selection, got {n_blocks}"
    if why is None:
        return name
    if backend == "triton" or backends.forced_backend() == "triton":
        raise DsCoreError(f"backend: {why}")
    return "torch"


def _max_select_blocks() -> int:
    from ds_core.kernels.triton_attention import MAX_SELECT_BLOCKS

    return MAX_SELECT_BLOCKS


def _triton_unsupported(q: Tensor, k: Tensor, block_size: int) -> str | None:
    """Why the Triton kernels cannot take this problem, or None."""
    if block_size < 16 or block_size & (block_size - 1):
        return f"attention_block_size must be a power of two >= 16 for Triton, got {block_size}"
    if q.shape[3] > 256:
        return f"head dim must be <= 256 for Triton, got {q.shape[3]}"
    if q.shape[1] // k.shape[1] > 64:
        return f"GQA group must be <= 64 heads for Triton, got {q.shape[1] // k.shape[1]}"
    return None


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    sparsity: SparsityConfig | None = None,
    causal: bool = True,
    q_start: int | None = None,
    backend: str = "auto",
    pooled_k: Tensor | None = None,
    kv_length: Tensor | None = None,
    kv_start: Tensor | None = None,
) -> Tensor:
    """Causal attention over the selected key blocks: q (B, Hq, Tq, D), k/v (B, Hkv, S, D) -> (B, Hq, Tq, D).

    q is post-RoPE; k, v are the valid prefix of the KV cache. The queries sit at positions
    ``q_start .. q_start + Tq - 1`` of the S keys (default: the last Tq). ``pooled_k``
    (B, Hkv, >= S // block_size, D) is an optional cache of mean keys per block (see
    ``pool_keys``); without it the means are computed from k.

    Fixed-shape decode (Tq = 1): with ``kv_length`` (an integer tensor, () / (1,) / (B,)), k and v
    are the whole cache and row b's keys are slots ``kv_start[b] .. kv_length[b] - 1`` (kv_start
    (B,), default 0: left padding before it), the query being the last of them. The result is
    that of ``sparse_attention(q[b:b+1], k[b:b+1, :, kv_start[b]:kv_length[b]], ...)``, with
    no host sync. ``pooled_k`` is then laid out per row from kv_start, and its row of the
    latest complete block is rewritten by the call (so calling once per step keeps it exact).
    The values must satisfy 0 <= kv_start < kv_length <= S (not checked: that would sync).
    """
    if kv_length is not None or kv_start is not None:
        if kv_length is None:
            raise DsCoreError("kv_start: only meaningful with kv_length")
        _check_inputs(q, k, v, None, causal)
        start, length = _check_lengths(q, k, kv_length, kv_start, q_start)
        cfg = SparsityConfig() if sparsity is None else sparsity
        if not isinstance(cfg, SparsityConfig):
            raise DsCoreError(f"sparsity: expected a SparsityConfig or None, got {type(cfg).__name__}")
        return _dynamic_decode(q, k, v, cfg, start, length, pooled_k, backend)
    q_start = _check_inputs(q, k, v, q_start, causal)
    cfg = SparsityConfig() if sparsity is None else sparsity
    if not isinstance(cfg, SparsityConfig):
        raise DsCoreError(f"sparsity: expected a SparsityConfig or None, got {type(cfg).__name__}")
    keep_keys = cfg.attention_keep_keys
    if cfg.attention_sparse_ratio == 0.0 and keep_keys is None:
        backends.resolve(backend, q.device)  # still reject a bad backend name
        return _dense(q, k, v, q_start, causal)

    B, _, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    bs = cfg.attention_block_size
    sinks, local = cfg.sink_blocks, max(1, cfg.local_blocks)  # a query always sees its own block
    n_blocks = -(-S // bs)
    first = q_start // bs
    n_qblocks = (q_start + Tq - 1) // bs - first + 1
    counts = block_counts(
        first,
        n_qblocks,
        n_blocks,
        causal=causal,
        sink_blocks=sinks,
        local_blocks=local,
        keep_fraction=1.0 - cfg.attention_sparse_ratio,
        keep_blocks=None if keep_keys is None else -(-keep_keys // bs),
    )
    n_visible = (
        torch.arange(first + 1, first + n_qblocks + 1) if causal else torch.full_like(counts, n_blocks)
    )
    if bool((counts == n_visible).all()):  # the budget covers every visible block: that is dense
        backends.resolve(backend, q.device)
        return _dense(q, k, v, q_start, causal)
    if pooled_k is not None:
        need = S // bs if causal else n_blocks  # a causal partial last block is always forced
        _check_pooled(pooled_k, (B, Hkv, need, D), q.device)

    if _backend(backend, q, k, bs) == "triton":
        from ds_core.kernels.triton_attention import sparse_attention_triton

        return sparse_attention_triton(
            q,
            k,
            v,
            counts,
            block_size=bs,
            q_start=q_start,
            causal=causal,
            sink_blocks=sinks,
            local_blocks=local,
            pooled_k=pooled_k,
        )
    if pooled_k is None:
        pooled_k = pool_keys(k, bs)
    scores = block_scores(
        q,
        pooled_k,
        block_size=bs,
        q_start=q_start,
        n_blocks=n_blocks,
        causal=causal,
        sink_blocks=sinks,
        local_blocks=local,
    )
    indices = select_blocks(scores, counts)
    return gather_sparse_attention(q, k, v, indices, counts, block_size=bs, q_start=q_start, causal=causal)


class SparseAttention(nn.Module):
    """``sparse_attention`` as a module that owns its ``SparsityConfig`` (no parameters).

    ``forward(q, k, v, q_start=None, pooled_k=None)`` with q (B, Hq, Tq, D) post-RoPE and k, v
    (B, Hkv, S, D) the valid KV prefix; returns (B, Hq, Tq, D).
    """

    def __init__(self, sparsity: SparsityConfig | None = None, *, causal: bool = True, backend: str = "auto"):
        super().__init__()
        self.sparsity = SparsityConfig() if sparsity is None else sparsity
        self.causal = causal
        self.backend = backend

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, q_start: int | None = None, pooled_k: Tensor | None = None
    ) -> Tensor:
        return sparse_attention(
            q,
            k,
            v,
            sparsity=self.sparsity,
            causal=self.causal,
            q_start=q_start,
            backend=self.backend,
            pooled_k=pooled_k,
        )

    def extra_repr(self) -> str:
        keep = self.sparsity.attention_keep_keys
        budget = f"keep_keys={keep}" if keep else f"ratio={self.sparsity.attention_sparse_ratio}"
        return f"{budget}, block_size={self.sparsity.attention_block_size}, causal={self.causal}"
