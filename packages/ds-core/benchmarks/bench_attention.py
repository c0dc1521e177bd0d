"""Adaptive sparse attention vs F.scaled_dot_product_attention (flash backend), one GPU, one run.

Decode: one query token per sequence over a KV cache of 32k / 64k keys with 2048 keys kept,
batch 1, 32 query heads, 8 KV heads, head dim 128, bf16. The sparse time includes the block
scores (from the pooled-key cache a decoder keeps next to its KV cache), the top-k selection and
the attention. Prefill: 32k causal with 10% of the key blocks kept (attention_sparse_ratio 0.9),
including pooling, scoring and selection.

Timing (``timing.py``, shared by the ds-core benchmarks): each op is captured in a CUDA graph
(a decoder replays graphs; this removes Python launch cost from both sides alike), the 50 MB L2
is flushed by writing a 256 MB buffer before every replay, each replay sits between two CUDA
events, and the median of many is reported.
Eager timings (triton.testing.do_bench, median, its own L2 flush) are recorded too.

Also (``mha``): ds-7b's decode shape (MHA, 32 heads, ratio 0.3) per layer, the scores, ticket
and rank kernels alone with their bandwidth on the kept bytes, under several settings of the
decode knobs (``triton_attention.DECODE_TUNING``); and for the decode cases the whole op under
other knob settings (SWEEP),
each checked against the torch path eagerly and replayed from a graph.

    python packages/ds-core/benchmarks/bench_attention.py --out attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
import triton
from timing import copy_bandwidth_GBs, rel_err, save_json, time_cpu, time_gpu
from torch.nn.attention import SDPBackend, sdpa_kernel

from ds_core.config import SparsityConfig
from ds_core.kernels import triton_attention as ta
from ds_core.kernels import triton_coop as tc
from ds_core.kernels import triton_rank as tr
from ds_core.kernels.reference_attention import (
    block_counts,
    block_scores,
    pool_keys,
    reference_sparse_attention,
    select_blocks,
)
from ds_core.sparse_attention import sparse_attention

DEV = torch.device("cuda")


def config(ratio: float = 0.0, keep_keys: int | None = None, block_size: int = 64) -> SparsityConfig:
    return SparsityConfig(
        attention_sparse_ratio=ratio, attention_block_size=block_size, attention_keep_keys=keep_keys
    )


def time_graph(fn, reps: int, graph: bool = True) -> dict:
    """``timing.time_gpu``: CUDA-graph replays (or plain calls), L2 flushed before each."""
    return time_gpu(fn, reps, graph=graph)


def time_eager(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def check(results: dict, dtypes: list[str]) -> str:
    """Triton kernels vs the reference on the GPU, on shared selections."""
    torch.manual_seed(0)
    rows = []
    for dtype in [getattr(torch, name) for name in dtypes]:
        for B, Hq, Hkv, S, D, bs, Tq, q_start in [
            (1, 32, 8, 4096, 128, 64, 1, 4095),
            (2, 8, 2, 3000, 64, 64, 1, 2999),
            (2, 12, 4, 1000, 128, 32, 1, 700),
            (1, 32, 8, 2048, 128, 64, 2048, 0),
            (2, 8, 2, 1500, 64, 64, 300, 1000),
            (1, 4, 4, 777, 128, 128, 777, 0),
        ]:
            entry = {"dtype": str(dtype), "shape": [B, Hq, Hkv, S, D, bs, Tq, q_start]}
            guarded(entry, "result", partial(check_case, entry, dtype, B, Hq, Hkv, S, D, bs, Tq, q_start))
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    results["check"] = rows
    return "done"


def check_case(entry, dtype, B, Hq, Hkv, S, D, bs, Tq, q_start) -> str:
    q = torch.randn(B, Hq, Tq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=DEV, dtype=dtype)
    nblk, first = -(-S // bs), q_start // bs
    nqb = (q_start + Tq - 1) // bs - first + 1
    counts = block_counts(
        first, nqb, nblk, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=0.2, keep_blocks=None
    )
    geo = dict(block_size=bs, q_start=q_start, n_blocks=nblk, causal=True, sink_blocks=1, local_blocks=2)
    pooled = pool_keys(k, bs)
    scores = block_scores(q, pooled, **geo)
    idx = select_blocks(scores, counts)
    ref = reference_sparse_attention(q, k, v, idx, counts, block_size=bs, q_start=q_start)
    if Tq == 1:
        s2 = ta.decode_block_scores(q, pooled, **geo)
        fin = scores.isfinite()
        entry["scores_match_inf"] = bool((s2.isinf() == scores.isinf()).all())
        entry["scores_max_err"] = (s2[fin] - scores[fin]).abs().max().item() if fin.any() else 0.0
        entry["select_equal"] = bool(torch.equal(ta.select_top_blocks(scores, int(counts[0])), idx))
        fused_idx = ta.decode_top_blocks(q, pooled, int(counts[0]), **geo)
        entry["fused_select_equal"] = bool(torch.equal(fused_idx, idx))
        r_out, r_idx = ta.rank_decode(
            q, k, v, s2.reshape(-1, nblk), int(counts[0]), block_size=bs, q_start=q_start
        )
        entry["rank_select_equal"] = bool(torch.equal(r_idx.sort(-1).values, idx))
        entry["rank_rel"] = rel_err(r_out, ref)
        for ns in (1, 4, None):
            out = ta.block_sparse_decode(q, k, v, idx, block_size=bs, q_start=q_start, n_splits=ns)
            entry[f"decode_ns{ns}_rel"] = rel_err(out, ref)
    else:
        out = ta.block_sparse_prefill(q, k, v, idx, counts, block_size=bs, q_start=q_start)
        entry["prefill_rel"] = rel_err(out, ref)
    cfg = config(0.8, block_size=bs)
    full = sparse_attention(q, k, v, sparsity=cfg, q_start=q_start, backend="triton")
    gath = sparse_attention(q, k, v, sparsity=cfg, q_start=q_start, backend="torch")
    entry["op_triton_vs_torch_rel"] = rel_err(full, gath)
    if Tq == 1:  # CUDA-graph replays (atomic tickets are reset by the kernel) give the eager result
        static = {}
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static["out"] = sparse_attention(q, k, v, sparsity=cfg, q_start=q_start)
        for _ in range(3):
            g.replay()
        entry["graph_replay_rel"] = rel_err(static["out"], full)
    return "ok"


SDPA_BACKEND = [SDPBackend.FLASH_ATTENTION]


def flash_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The baseline: SDPA on its flash backend (GQA without repeating K/V)."""
    with sdpa_kernel(SDPA_BACKEND):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def pick_sdpa_backend(results: dict) -> None:
    q = torch.randn(1, 32, 16, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 256, 128, device=DEV, dtype=torch.bfloat16)
    try:
        flash_sdpa(q, k, k, False)
        results["sdpa_backend"] = "FLASH_ATTENTION, enable_gqa=True"
    except RuntimeError as e:  # no GQA on flash in this torch: let SDPA choose among its fused kernels
        SDPA_BACKEND[:] = [
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
        ]
        results["sdpa_backend"] = f"flash refused GQA ({str(e)[:200]}); fused backends allowed"
    print("baseline:", results["sdpa_backend"], flush=True)


def guarded(store: dict, name: str, fn) -> None:
    """Run one measurement; a failing variant is recorded, not fatal."""
    try:
        store[name] = fn()
    except Exception as e:  # a sweep keeps going past one bad config
        store[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(f"{name}: {store[name]['error']}", flush=True)


def layered(op, layers: list, reps: int) -> dict:
    """Per-layer time of op over every layer's own KV cache, all layers in one CUDA graph.

    This is how a decoder runs (one graph per step, layers back to back); each layer reads its
    own cache, so the working set is far larger than L2 even without the flush.
    """

    def step():
        for kv in layers:
            op(*kv)

    t = time_graph(step, reps)
    return {k: v / len(layers) if k.endswith("_us") else v for k, v in t.items()}


# decode variants timed next to the default (name, DECODE_TUNING overrides). The default for GQA is
# "coop" (one launch: scores, a per-row barrier, selection and attention, triton_coop.py);
# "ticket" is the previous default: scores + a bisection top-k by the row's last program, then
# the split attention kernel
SWEEP = [
    ("ticket", {"path": "ticket"}),
    ("rank", {"path": "rank"}),
    ("coop_p8", {"path": "coop", "coop_programs": 8}),
    ("coop_plain_launch", {"path": "coop", "coop_launch": False}),
    ("coop_merge_loop", {"path": "coop", "coop_merge_unrolled": False}),
]
# variants also timed per layer of the n_layers-layer graph (the decoder's setting)
LAYERED_SWEEP = [
    ("ticket", {"path": "ticket"}),
    ("coop_merge_loop", {"path": "coop", "coop_merge_unrolled": False}),
]


def graph_rel(op, ref) -> dict:
    """Relative error against ref of op eagerly and of op captured in a CUDA graph, replayed 3x."""
    out = {"eager": rel_err(op(), ref)}
    static = {}
    g = torch.cuda.CUDAGraph()
    op()
    with torch.cuda.graph(g):
        static["out"] = op()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    out["graph"] = rel_err(static["out"], ref)
    return out


def mha_bench(results: dict, reps: int, n_layers: int = 8) -> str:
    """ds-7b's attention shape (MHA, 32 heads, head dim 128, ratio 0.3, 8448 slots, 8256 valid):
    the rank kernel alone over n_layers layers' caches in one graph, its bandwidth on the kept
    bytes, under each knob setting; the scores kernel and the ticket kernels alone."""
    B, H, S, D, bs = 1, 32, 8256, 128, 64
    dt = torch.bfloat16
    torch.manual_seed(7)
    q = torch.randn(B, H, 1, D, device=DEV, dtype=dt)
    layers = []
    for _ in range(n_layers):
        k = torch.randn(B, H, S, D, device=DEV, dtype=dt)
        v = torch.randn(B, H, S, D, device=DEV, dtype=dt)
        layers.append((k, v, pool_keys(k, bs).to(dt)))
    n = -(-S // bs)
    counts = block_counts(
        (S - 1) // bs, 1, n, causal=True, sink_blocks=1, local_blocks=2, keep_fraction=0.7, keep_blocks=None
    )
    count = int(counts[0])
    geo = dict(block_size=bs, q_start=S - 1, n_blocks=n, causal=True, sink_blocks=1, local_blocks=2)
    scores = [ta.decode_block_scores(q, p, **geo) for _, _, p in layers]
    kept_bytes = 2 * count * bs * D * 2 * H * B
    row: dict = {"keys": S, "kept_blocks": count, "kept_bytes_per_layer": kept_bytes, "layers": n_layers}
    results["mha"] = row

    def per_layer(fn):
        t = time_graph(lambda: [fn(i) for i in range(n_layers)], reps)
        return t["median_us"] / n_layers

    row["scores_us"] = per_layer(lambda i: ta.decode_block_scores(q, layers[i][2], **geo))
    row["ticket_select_us"] = per_layer(lambda i: ta.decode_top_blocks(q, layers[i][2], count, **geo))
    idx = ta.decode_top_blocks(q, layers[0][2], count, **geo)
    row["ticket_attn_us"] = per_layer(  # one index load per block (the default)
        lambda i: ta.block_sparse_decode(q, layers[i][0], layers[i][1], idx, block_size=bs, q_start=S - 1)
    )
    row["sdpa_us"] = per_layer(lambda i: flash_sdpa(q, layers[i][0], layers[i][1], False))
    saved = dict(ta.DECODE_TUNING)
    for name, knobs in MHA_SWEEP:
        ta.DECODE_TUNING.update(saved)
        ta.DECODE_TUNING.update(knobs)

        def rank(i):
            return tr.rank_decode(
                q, layers[i][0], layers[i][1], scores[i], count, block_size=bs, q_start=S - 1
            )

        entry: dict = {}
        guarded(entry, "us", partial(per_layer, rank))
        if isinstance(entry["us"], float):
            entry["TBs"] = kept_bytes / entry["us"] / 1e6
        row[f"rank[{name}]"] = entry
        print(name, json.dumps(entry), flush=True)
    for name, knobs in MHA_COOP:  # scores, selection and attention in one launch
        ta.DECODE_TUNING.update(saved)
        ta.DECODE_TUNING.update(knobs)
        entry = {}
        guarded(
            entry,
            "us",
            partial(
                per_layer,
                lambda i: tc.coop_decode(q, layers[i][0], layers[i][1], layers[i][2], count, **geo),
            ),
        )
        if isinstance(entry["us"], float):
            entry["TBs"] = kept_bytes / entry["us"] / 1e6
        row[f"coop[{name}]"] = entry
        print("coop", name, json.dumps(entry), flush=True)
    ta.DECODE_TUNING.update(saved)
    return "done"


MHA_COOP = [
    ("default", {"path": "coop"}),
    ("st3", {"path": "coop", "num_stages": 3}),
]

MHA_SWEEP = [
    ("default", {}),
    ("W8_CH2_st2", {"blocks_per_program": 8, "chunk_blocks": 2, "num_stages": 2}),
]


def trace_coop(q, k, v, pooled, count: int, bs: int, reps: int = 5) -> dict:
    """Phase times (us from the launch's first program start) of one coop_decode launch, from the
    %globaltimer stamps each program writes: start, scored, past the barrier, selected,
    attended, done. L2 flushed before each of ``reps`` launches; medians over launches of the
    median and the last program of each phase."""
    from timing import FLUSH_BYTES, _flush

    dev = q.device
    if dev not in _flush:
        _flush[dev] = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=dev)
    flush = _flush[dev]
    S = k.shape[2]
    n = -(-S // bs)
    geo = dict(block_size=bs, q_start=S - 1, n_blocks=n, causal=True, sink_blocks=1, local_blocks=2)
    rows = k.shape[0] * k.shape[1]
    P = tc.coop_programs(rows, n, dev)
    names = ["start", "scored", "barrier", "selected", "attended", "done"]
    runs: dict = {f"{a}_{b}": [] for a in names for b in ("median", "last")}
    for _ in range(reps + 1):
        tr = torch.zeros(rows, P, 8, dtype=torch.int64, device=dev)
        flush.zero_()
        tc.coop_decode(q, k, v, pooled, count, **geo, trace=tr)
        torch.cuda.synchronize()
        t = tr[..., :6].reshape(-1, 6).double()
        t = (t - t[:, 0].min()) / 1e3
        for i, a in enumerate(names):
            runs[f"{a}_median"].append(t[:, i].median().item())
            runs[f"{a}_last"].append(t[:, i].max().item())
    out = {name: sorted(vals[1:])[len(vals[1:]) // 2] for name, vals in runs.items()}  # first run warms up
    out["programs_per_row"] = P
    return out


def decode_bench(results: dict, contexts: list[int], keep_keys: int, reps: int, n_layers: int) -> str:
    B, Hq, Hkv, D = 1, 32, 8, 128
    dt = torch.bfloat16
    out_rows: list = []
    results["decode"] = out_rows
    tiny = torch.zeros(1, device=DEV)
    results["graph_floor_us"] = time_graph(partial(tiny.add_, 1), reps)["median_us"]
    for S in contexts:
        torch.manual_seed(S)
        q = torch.randn(B, Hq, 1, D, device=DEV, dtype=dt)
        k = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
        v = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
        kv_bytes = 2 * k.numel() * k.element_size()
        row: dict = {"context": S, "keep_keys": keep_keys, "kv_bytes": kv_bytes}
        out_rows.append(row)
        sdpa = partial(flash_sdpa, q, k, v, False)
        row["sdpa_flash"] = time_graph(sdpa, reps)
        row["sdpa_flash_eager_us"] = time_eager(sdpa)
        base = row["sdpa_flash"]["median_us"]
        row["sdpa_bw_GBs"] = kv_bytes / base / 1e3
        for bs in (64, 128):
            cfg = config(keep_keys=keep_keys, block_size=bs)
            pooled = pool_keys(k, bs).to(dt)  # the decoder's pooled-key cache
            n_keep = -(-keep_keys // bs)
            moved = 2 * n_keep * bs * D * Hkv * B * 2 + pooled.numel() * 2 + 2 * q.numel() * 2
            op = partial(sparse_attention, q, k, v, sparsity=cfg, pooled_k=pooled)
            got, ref = op(backend="triton"), op(backend="torch")
            full = time_graph(op, reps)
            entry = {
                "block_size": bs,
                "kept_blocks": n_keep,
                "bytes": moved,
                "op": full,
                "op_eager_us": time_eager(op),
                "speedup": base / full["median_us"],
                "bw_GBs": moved / full["median_us"] / 1e3,
                "rel_err_vs_torch_path": rel_err(got, ref),
                "components": {},
            }
            row[f"sparse_bs{bs}"] = entry
            # components, each in its own graph (so each pays the graph floor)
            n_blocks = -(-S // bs)
            geo = dict(
                block_size=bs, q_start=S - 1, n_blocks=n_blocks, causal=True, sink_blocks=1, local_blocks=2
            )
            scores = ta.decode_block_scores(q, pooled, **geo)
            idx = ta.select_top_blocks(scores, n_keep)
            comp = entry["components"]
            guarded(
                comp, "scores", partial(time_graph, partial(ta.decode_block_scores, q, pooled, **geo), reps)
            )
            guarded(comp, "select", partial(time_graph, partial(ta.select_top_blocks, scores, n_keep), reps))
            for nw in (4, 8):  # one launch: the row's last program selects
                guarded(
                    comp,
                    f"scores+select_w{nw}",
                    partial(
                        time_graph,
                        partial(ta.decode_top_blocks, q, pooled, n_keep, **geo, num_warps=nw),
                        reps,
                    ),
                )
            for ns, st, nw in [(None, 2, 4), (8, 3, 4), (16, 3, 4), (16, 2, 4), (32, 1, 4), (16, 2, 8)]:
                attn = partial(
                    ta.block_sparse_decode,
                    q,
                    k,
                    v,
                    idx,
                    block_size=bs,
                    q_start=S - 1,
                    n_splits=ns,
                    num_stages=st,
                    num_warps=nw,
                )
                guarded(comp, f"attn_ns{ns}_st{st}_w{nw}", partial(time_graph, attn, reps))
            # the whole op under other settings of the decode knobs (ta.DECODE_TUNING)
            saved = dict(ta.DECODE_TUNING)
            for name, knobs in SWEEP:
                ta.DECODE_TUNING.update(saved)
                ta.DECODE_TUNING.update(knobs)
                guarded(entry, f"op[{name}]", partial(time_graph, op, reps))
                guarded(entry, f"rel[{name}]", partial(graph_rel, op, ref))
            ta.DECODE_TUNING.update(saved)
            if bs == 64:
                for name, knobs in (("coop", {"path": "coop"}),):
                    ta.DECODE_TUNING.update(saved)
                    ta.DECODE_TUNING.update(knobs)
                    guarded(entry, f"trace[{name}]", partial(trace_coop, q, k, v, pooled, n_keep, bs))
                ta.DECODE_TUNING.update(saved)
                print(
                    json.dumps({key: val for key, val in entry.items() if key.startswith("trace")}),
                    flush=True,
                )
                # the same op recomputing the pooled keys from the whole K cache each call
                entry["op_no_pool_cache"] = time_graph(partial(sparse_attention, q, k, v, sparsity=cfg), reps)
            print(json.dumps(entry), flush=True)
        print(
            f"decode S={S}: sdpa {base:.1f} us, sparse {row['sparse_bs64']['op']['median_us']:.1f} us",
            flush=True,
        )
        # a decode step of n_layers layers in one graph, each layer with its own cache
        del k, v
        caches = []
        for _ in range(n_layers):
            kl = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
            vl = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
            caches.append((kl, vl, pool_keys(kl, 64).to(dt)))
        cfg = config(keep_keys=keep_keys, block_size=64)
        row["layered"] = {
            "layers": n_layers,
            "sdpa_flash": layered(
                lambda kl, vl, pl, q=q: flash_sdpa(q, kl, vl, False), caches, max(20, reps // 10)
            ),
            "sparse_bs64": layered(
                lambda kl, vl, pl, q=q, cfg=cfg: sparse_attention(q, kl, vl, sparsity=cfg, pooled_k=pl),
                caches,
                max(20, reps // 10),
            ),
        }
        lay = row["layered"]
        lay["speedup"] = lay["sdpa_flash"]["median_us"] / lay["sparse_bs64"]["median_us"]
        saved = dict(ta.DECODE_TUNING)
        for name, knobs in LAYERED_SWEEP:
            ta.DECODE_TUNING.update(saved)
            ta.DECODE_TUNING.update(knobs)
            guarded(
                lay,
                f"sparse_bs64[{name}]",
                partial(
                    layered,
                    lambda kl, vl, pl, q=q, cfg=cfg: sparse_attention(q, kl, vl, sparsity=cfg, pooled_k=pl),
                    caches,
                    max(20, reps // 10),
                ),
            )
        ta.DECODE_TUNING.update(saved)
        print(json.dumps(lay), flush=True)
        del caches
    return "done"


def prefill_bench(results: dict, S: int, ratio: float, reps: int) -> str:
    B, Hq, Hkv, D = 1, 32, 8, 128
    dt = torch.bfloat16
    torch.manual_seed(1)
    q = torch.randn(B, Hq, S, D, device=DEV, dtype=dt)
    k = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
    v = torch.randn(B, Hkv, S, D, device=DEV, dtype=dt)
    row: dict = {"seq": S, "ratio": ratio}
    results["prefill"] = row
    row["sdpa_flash"] = time_graph(partial(flash_sdpa, q, k, v, True), reps, graph=False)
    base = row["sdpa_flash"]["median_us"]
    row["sdpa_TFLOPs"] = 4 * B * Hq * D * S * S / 2 / base / 1e6
    for bs in (64, 128):
        cfg = config(ratio=ratio, block_size=bs)
        nblk = -(-S // bs)
        counts = block_counts(
            0,
            nblk,
            nblk,
            causal=True,
            sink_blocks=1,
            local_blocks=2,
            keep_fraction=1 - ratio,
            keep_blocks=None,
        )
        sparse_flops = 4 * B * Hq * D * bs * bs * counts.sum().item()
        full = time_graph(partial(sparse_attention, q, k, v, sparsity=cfg), reps, graph=False)
        geo = dict(block_size=bs, q_start=0, n_blocks=nblk, causal=True, sink_blocks=1, local_blocks=2)
        pooled = pool_keys(k, bs)
        scores = block_scores(q, pooled, **geo)
        idx = select_blocks(scores, counts)
        entry = {
            "block_size": bs,
            "kept_block_fraction": counts.sum().item() / (nblk * (nblk + 1) / 2),
            "op": full,
            "speedup": base / full["median_us"],
            "pool_us": time_graph(partial(pool_keys, k, bs), reps, graph=False)["median_us"],
            "scores_us": time_graph(partial(block_scores, q, pooled, **geo), reps, graph=False)["median_us"],
            "select_us": time_graph(partial(select_blocks, scores, counts), reps, graph=False)["median_us"],
            "kernels": {},
        }
        row[f"sparse_bs{bs}"] = entry
        variants = (
            [(2, 4, 2), (2, 4, 3), (4, 8, 3), (2, 8, 3), (1, 4, 3)] if bs == 64 else [(1, 8, 2), (1, 8, 3)]
        )
        for hpp, warps, stages in variants:
            kern = partial(
                ta.block_sparse_prefill,
                q,
                k,
                v,
                idx,
                counts,
                block_size=bs,
                q_start=0,
                heads_per_program=hpp,
                num_warps=warps,
                num_stages=stages,
            )
            name = f"hpp{hpp}_w{warps}_st{stages}"
            guarded(entry["kernels"], name, partial(time_graph, kern, reps, graph=False))
            t = entry["kernels"][name].get("median_us")
            if t:
                entry["kernels"][name]["TFLOPs"] = sparse_flops / t / 1e6
        print(json.dumps(entry), flush=True)
    return "done"


def cpu_bench(out_path: str, S: int, keep_keys: int, prefill_len: int, ratio: float, reps: int) -> int:
    """The PyTorch gather path on the CPU vs SDPA on the CPU (float32, same shapes as the GPU run)."""
    import platform

    B, Hq, Hkv, D = 1, 32, 8, 128

    def median_ms(fn) -> float:
        return time_cpu(fn, reps)["median_us"] / 1e3

    torch.manual_seed(0)
    results: dict = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    q, k, v = (torch.randn(B, h, t, D) for h, t in ((Hq, 1), (Hkv, S), (Hkv, S)))
    cfg = SparsityConfig(attention_keep_keys=keep_keys)
    pooled = pool_keys(k, cfg.attention_block_size)
    dense_ms = median_ms(partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True))
    sparse_ms = median_ms(partial(sparse_attention, q, k, v, sparsity=cfg, pooled_k=pooled, backend="torch"))
    results["decode"] = {"context": S, "keep_keys": keep_keys, "sdpa_ms": dense_ms, "sparse_ms": sparse_ms}
    q, k, v = (torch.randn(B, h, prefill_len, D) for h in (Hq, Hkv, Hkv))
    cfg = SparsityConfig(attention_sparse_ratio=ratio)
    dense_ms = median_ms(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True))
    sparse_ms = median_ms(partial(sparse_attention, q, k, v, sparsity=cfg, backend="torch"))
    results["prefill"] = {"seq": prefill_len, "ratio": ratio, "sdpa_ms": dense_ms, "sparse_ms": sparse_ms}
    save_json(out_path, results)
    for name in ("decode", "prefill"):
        r = results[name]
        print(
            f"{name}: SDPA {r['sdpa_ms']:.2f} ms, sparse {r['sparse_ms']:.2f} ms, {r['sdpa_ms'] / r['sparse_ms']:.2f}x"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="bench_attention.json", help="where to write the JSON results")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536], help="decode context lengths")
    ap.add_argument("--keep-keys", type=int, default=2048, help="decode key budget")
    ap.add_argument("--prefill-len", type=int, default=32768, help="prefill sequence length")
    ap.add_argument("--prefill-ratio", type=float, default=0.9, help="attention_sparse_ratio for prefill")
    ap.add_argument("--layers", type=int, default=32, help="layers in the one-graph decode-step measurement")
    ap.add_argument("--reps", type=int, default=200, help="timed replays per decode measurement")
    ap.add_argument("--prefill-reps", type=int, default=15, help="timed replays per prefill measurement")
    ap.add_argument(
        "--check-dtypes", nargs="+", default=["bfloat16", "float16", "float32"], help="dtypes of the check"
    )
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["check", "mha", "decode", "prefill"], help="parts to skip"
    )
    ap.add_argument("--cpu", action="store_true", help="time the PyTorch CPU path instead (no GPU needed)")
    ap.add_argument("--cpu-prefill-len", type=int, default=4096, help="prefill length of the CPU run")
    args = ap.parse_args()
    if args.cpu:
        return cpu_bench(
            args.out, args.contexts[0], args.keep_keys, args.cpu_prefill_len, args.prefill_ratio, 10
        )
    if not torch.cuda.is_available():
        print("bench_attention: error: a CUDA device is required", file=sys.stderr)
        return 2
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(sys.argv),
    }
    t0 = time.time()
    results["copy_GBs"] = copy_bandwidth_GBs()
    print(f"copy bandwidth {results['copy_GBs']:.0f} GB/s", flush=True)
    pick_sdpa_backend(results)
    try:
        if "check" not in args.skip:
            guarded(results, "check_status", partial(check, results, args.check_dtypes))
        if "mha" not in args.skip:
            guarded(results, "mha_status", partial(mha_bench, results, args.reps))
        if "decode" not in args.skip:
            guarded(
                results,
                "decode_status",
                partial(decode_bench, results, args.contexts, args.keep_keys, args.reps, args.layers),
            )
        if "prefill" not in args.skip:
            guarded(
                results,
                "prefill_status",
                partial(prefill_bench, results, args.prefill_len, args.prefill_ratio, args.prefill_reps),
            )
    finally:
        results["wall_s"] = time.time() - t0
        save_json(args.out, results)
    try:
        print("\n| case | SDPA flash (us) | sparse (us) | speedup | sparse BW |")
        print("|---|---|---|---|---|")
        for row in results.get("decode", []):
            sp = row["sparse_bs64"]
            print(
                f"| decode {row['context'] // 1024}k, {args.keep_keys} keys | {row['sdpa_flash']['median_us']:.1f} | "
                f"{sp['op']['median_us']:.1f} | {sp['speedup']:.2f}x | "
                f"{sp['bw_GBs']:.0f} GB/s ({100 * sp['bw_GBs'] / results['copy_GBs']:.0f}% of copy) |"
            )
        for row in results.get("decode", []):
            lay = row.get("layered")
            if lay:
                print(
                    f"| decode {row['context'] // 1024}k, per layer of a {lay['layers']}-layer graph | "
                    f"{lay['sdpa_flash']['median_us']:.1f} | {lay['sparse_bs64']['median_us']:.1f} | "
                    f"{lay['speedup']:.2f}x | |"
                )
        if "prefill" in results:
            row = results["prefill"]
            sp = row["sparse_bs64"]
            print(
                f"| prefill {args.prefill_len // 1024}k, ratio {args.prefill_ratio} | {row['sdpa_flash']['median_us']:.0f} | "
                f"{sp['op']['median_us']:.0f} | {sp['speedup']:.2f}x | |"
            )

    except (KeyError, TypeError) as e:
        print(f"incomplete results ({e!r}); see {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
