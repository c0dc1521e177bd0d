"""SparseMLP (SwiGLU 4096 x 11008, bf16) vs the dense cuBLAS SwiGLU, side by side in one run.

Dense baseline: ``F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wd)`` (three cuBLAS calls).
Cases: dynamic batch 1 at ratio 0.3 / 0.5 / 0.7, dynamic small batches (row-gather GEMM or the
dense fallback, whichever the layer picks), static batch 1 / 16 / 64 at ratio 0.3, and a
forced-fallback case. Dynamic thresholds are calibrated on random activations, so each token
skips about ``ratio`` of its inputs; the achieved skip fraction is recorded next to each case.

Timing (``timing.py``, shared by the ds-core benchmarks): each op is captured in a CUDA graph
(removes Python launch cost from both sides alike), the 50 MB L2 is flushed by writing a 256 MB
buffer before every replay, each replay sits between two CUDA events, and the median of many is
reported. ``--sweep`` first times the row-gather
kernels alone over a grid of launch configs and uses the best per kernel and batch.

    python packages/ds-core/benchmarks/bench_sparse_mlp.py --sweep --out sparse_mlp.json
    python packages/ds-core/benchmarks/bench_sparse_mlp.py --device cpu --out sparse_mlp_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import traceback
from functools import partial

import torch
import torch.nn.functional as F
from timing import copy_bandwidth_GBs, rel_err, save_json, time_cpu_pair, time_gpu

from ds_core import SparseMLP, SparsityConfig
from ds_core.kernels import reference

D_MODEL, D_FF = 4096, 11008
H100_BW = 3.35e12  # bytes/s, datasheet HBM3


# ------------------------------------------------------------------------------------- models
def make_mlp(
    mode: str, ratio: float, device: str, dtype: torch.dtype, base: SparseMLP | None = None
) -> SparseMLP:
    torch.manual_seed(0)
    with torch.device(device):
        mlp = SparseMLP(D_MODEL, D_FF, SparsityConfig(sparse_ratio=ratio, mode=mode)).to(dtype).eval()
    if base is not None:
        mlp.load_state_dict(base.state_dict(), strict=False)
    if mode == "dynamic" and ratio > 0:
        mlp.calibrate(torch.randn(256, D_MODEL, device=device, dtype=dtype))
    return mlp


def dense_swiglu(mlp: SparseMLP):
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    return lambda x: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def skip_fractions(mlp: SparseMLP, x: torch.Tensor) -> tuple[float, float, float, float]:
    """(input skip per token, hidden skip per token, input rows skipped by all, hidden rows skipped by all)."""
    t_in, t_h = mlp.act_threshold.float()
    with torch.no_grad():
        a_in = x.abs().float() > t_in
        h = F.silu(mlp.gate_proj(reference.sparsify(x, t_in))) * mlp.up_proj(reference.sparsify(x, t_in))
        a_h = h.abs().float() > t_h
    return (
        1 - a_in.float().mean().item(),
        1 - a_h.float().mean().item(),
        1 - a_in.any(0).float().mean().item(),
        1 - a_h.any(0).float().mean().item(),
    )


# -------------------------------------------------------------------------------------- sweep
def sweep_batch(args, T, mlp: SparseMLP, n_tok: int, grids: dict, out: dict) -> None:
    wgu_t, wd_t = mlp._transposed()
    t_in, t_h = mlp.act_threshold.float()[0:1], mlp.act_threshold.float()[1:2]
    x = torch.randn(n_tok, D_MODEL, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # the real hidden activations of this layer, so the down density is real
        xs = reference.sparsify(x, t_in)
        h = F.silu(mlp.gate_proj(xs)) * mlp.up_proj(xs)
    acc = torch.zeros(n_tok, 2 * D_FF + D_MODEL, device="cuda", dtype=torch.float32)
    for name in ("gate_up", "down"):
        rows = []
        for cfg in grids[name]:
            try:
                if name == "gate_up":
                    idx, cnt = T._compact(x, t_in, 0, cfg.k_split, acc)

                    def launch(cfg=cfg, x=x, idx=idx, cnt=cnt):
                        T._gemv(
                            x, t_in, 0, idx, cnt, wgu_t, D_FF, acc[:, :D_FF], acc[:, D_FF : 2 * D_FF], cfg
                        )
                else:
                    idx, cnt = T._compact(h, t_h, 0, cfg.k_split, acc)

                    def launch(cfg=cfg, h=h, idx=idx, cnt=cnt):
                        T._gemv(h, t_h, 0, idx, cnt, wd_t, D_MODEL, acc[:, 2 * D_FF :], None, cfg)

                r = time_gpu(launch, args.sweep_reps)
                rows.append({"config": list(cfg.__dict__.values()), "rows_kept": int(cnt.sum()), **r})
            except Exception as e:  # a config the compiler rejects is skipped, not fatal
                rows.append({"config": list(cfg.__dict__.values()), "error": str(e)[:200]})
        ok = sorted((r for r in rows if "median_us" in r), key=lambda r: r["median_us"])
        out[name][n_tok] = rows
        if ok:
            best = T.GatherConfig(*ok[0]["config"])
            table = T.GATE_UP_CONFIG if name == "gate_up" else T.DOWN_CONFIG
            table[1 if n_tok == 1 else 16] = best
            print(f"sweep {name} B={n_tok}: best {best} {ok[0]['median_us']:.1f} us; "
                  f"worst {ok[-1]['median_us']:.1f} us; rows kept {ok[0]['rows_kept']}", flush=True)  # fmt: skip
    # the compaction kernels alone (they run once per projection per call)
    cfg = T.GATE_UP_CONFIG[1 if n_tok == 1 else 16]
    g, u = acc[:, :D_FF], acc[:, D_FF : 2 * D_FF]
    hb = torch.empty(n_tok, D_FF, device="cuda", dtype=torch.bfloat16)
    out[f"compact_x_us_b{n_tok}"] = time_gpu(
        lambda: T._compact(x, t_in, 0, cfg.k_split, acc), args.sweep_reps
    )
    out[f"compact_h_us_b{n_tok}"] = time_gpu(
        lambda: T._compact(g, t_h, 0, cfg.k_split, acc[:0], u=u, h=hb), args.sweep_reps
    )


def sweep_fusion(args, T, mlp: SparseMLP, n_tok: int, out: dict) -> None:
    """Whole-layer timings: the unfused five-launch path with the best GEMV configs against the
    fused three-launch path over a few block shapes; install the fastest correct one."""
    wgu_t, wd_t = mlp._transposed()
    t = mlp.act_threshold
    key = 1 if n_tok == 1 else 16
    x = torch.randn(n_tok, D_MODEL, device="cuda", dtype=torch.bfloat16)
    ref = reference.dynamic_sparse_swiglu(x, *mlp._weights(), t[0], t[1])
    cands = [(False, T.GATE_UP_CONFIG[key], T.DOWN_CONFIG[key])]
    for gu in [T.GATE_UP_CONFIG[key], T.GatherConfig(64, 32, 128, 2, 1), T.GatherConfig(128, 32, 256, 4, 1)]:
        for d in [
            T.GatherConfig(64, 32, 64, 2, 1),
            T.GatherConfig(128, 32, 64, 4, 1),
            T.GatherConfig(64, 64, 64, 4, 1),
        ]:
            cands.append((True, gu, d))
    rows = []
    for fused, gu, d in cands:
        try:
            with torch.no_grad():
                got = T.dynamic_swiglu(x, wgu_t, wd_t, t[0], t[1], 0.5, configs=(gu, d), fused=fused)
                err = rel_err(got, ref)
                r = time_gpu(
                    lambda fused=fused, gu=gu, d=d: T.dynamic_swiglu(
                        x, wgu_t, wd_t, t[0], t[1], 0.5, configs=(gu, d), fused=fused
                    ),
                    args.sweep_reps * 2,
                )
            rows.append({"fused": fused, "gate_up": list(gu.__dict__.values()), "down": list(d.__dict__.values()),
                         "rel_err": err, **r})  # fmt: skip
            print(
                f"layer B={n_tok} fused={fused} {gu} {d}: {r['median_us']:.1f} us err {err:.1e}", flush=True
            )
        except Exception as e:
            rows.append({"fused": fused, "error": str(e)[:300]})
            traceback.print_exc()
    ok = sorted((r for r in rows if "median_us" in r and r["rel_err"] < 2e-2), key=lambda r: r["median_us"])
    out[f"layer_b{n_tok}"] = rows
    if ok:
        best = ok[0]
        T.FUSED[key] = best["fused"]
        T.GATE_UP_CONFIG[key] = T.GatherConfig(*best["gate_up"])
        T.DOWN_CONFIG[key] = T.GatherConfig(*best["down"])


def ratio_sweep(args, results: dict) -> None:
    """Batch 1, the five-launch layer at ratio 0.5 and 0.7 over (gate/up, down) launch-config pairs:
    does the best config move with the ratio (fewer rows per chunk at 0.7)?"""
    from ds_core.kernels import triton_mlp as T

    gus = [
        (64, 32, 256, 2),
        (64, 32, 512, 2),
        (64, 32, 512, 4),
        (128, 32, 512, 4),
        (64, 64, 512, 4),
        (32, 32, 256, 1),
    ]
    ds = [(64, 32, 128, 2), (64, 32, 256, 2), (64, 32, 256, 4), (128, 32, 256, 4)]
    out = results.setdefault("ratio_sweep", {})
    for ratio in (0.5, 0.7):
        mlp = make_mlp("dynamic", ratio, "cuda", torch.bfloat16)
        wgu_t, wd_t = mlp._transposed()
        t = mlp.act_threshold
        x = torch.randn(1, D_MODEL, device="cuda", dtype=torch.bfloat16)
        ref = reference.dynamic_sparse_swiglu(x, *mlp._weights(), t[0], t[1])
        rows = []
        for gu in gus:
            for d in ds:
                cfgs = (T.GatherConfig(*gu, 1), T.GatherConfig(*d, 1))
                try:
                    with torch.no_grad():
                        err = rel_err(T.dynamic_swiglu(x, wgu_t, wd_t, t[0], t[1], ratio, configs=cfgs), ref)
                        call = partial(T.dynamic_swiglu, x, wgu_t, wd_t, t[0], t[1], ratio, configs=cfgs)
                        r = time_gpu(call, args.sweep_reps * 2)
                    rows.append({"gate_up": gu, "down": d, "rel_err": err, **r})
                except Exception as e:
                    rows.append({"gate_up": gu, "down": d, "error": str(e)[:200]})
        ok = sorted(
            (r for r in rows if "median_us" in r and r["rel_err"] < 2e-2), key=lambda r: r["median_us"]
        )
        out[str(ratio)] = rows
        for r in ok[:3]:
            print(
                f"ratio {ratio}: gate_up {r['gate_up']} down {r['down']}: {r['median_us']:.1f} us", flush=True
            )
        default = [r for r in rows if r["gate_up"] == gus[0] and r["down"] == ds[0]]
        if default and "median_us" in default[0]:
            print(f"ratio {ratio}: default configs {default[0]['median_us']:.1f} us", flush=True)
        save(args, results)


def sweep(args, results: dict) -> None:
    """Time each row-gather GEMV alone (its row lists built beforehand) over launch configs at
    ratio 0.5; install the best per kernel and batch."""
    from ds_core.kernels import triton_mlp as T

    mlp = make_mlp("dynamic", 0.5, "cuda", torch.bfloat16)
    grid_all = [
        T.GatherConfig(bn, bk, ks, w, 1)
        for bn, bk, ks, w in [
            (64, 32, 256, 2), (64, 16, 128, 2), (32, 32, 128, 1), (32, 64, 512, 2), (64, 32, 128, 2),
            (64, 64, 256, 4), (64, 64, 512, 4), (128, 32, 256, 4), (64, 32, 512, 4), (128, 64, 512, 8),
        ]
    ]  # fmt: skip
    out: dict = {"gate_up": {}, "down": {}}
    for n_tok in (1, 4):
        grids = {"gate_up": grid_all, "down": grid_all}
        if n_tok > 1:  # batched: retry only the eight best batch-1 configs of each kernel
            grids = {
                k: [T.GatherConfig(*r["config"]) for r in sorted(
                    (r for r in out[k][1] if "median_us" in r), key=lambda r: r["median_us"])[:8]]
                for k in ("gate_up", "down")
            }  # fmt: skip
        sweep_batch(args, T, mlp, n_tok, grids, out)
    for n_tok in (1, 4):
        sweep_fusion(args, T, mlp, n_tok, out)
    out["chosen"] = {
        "fused": dict(T.FUSED),
        "gate_up": {k: list(v.__dict__.values()) for k, v in T.GATE_UP_CONFIG.items()},
        "down": {k: list(v.__dict__.values()) for k, v in T.DOWN_CONFIG.items()},
    }
    results["sweep"] = out


# -------------------------------------------------------------------------------------- cases
def run_cases(args, results: dict) -> None:
    dev, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)
    timer = lambda fn: time_gpu(fn, args.reps)  # noqa: E731
    dense_bytes = 3 * D_MODEL * D_FF * torch.finfo(dtype).bits // 8
    base = make_mlp("dynamic", 0.0, dev, dtype)
    dense = dense_swiglu(base)
    rows = results.setdefault("cases", [])
    dense_cache: dict[int, dict] = {}

    def dense_time(n_tok: int) -> dict:
        if n_tok not in dense_cache:
            x = torch.randn(n_tok, D_MODEL, device=dev, dtype=dtype)
            with torch.no_grad():
                dense_cache[n_tok] = timer(lambda: dense(x))
        return dense_cache[n_tok]

    def case(
        name: str,
        mode: str,
        ratio: float,
        n_tok: int,
        target: float | None,
        fused: bool | None = None,
        **cfg_kw,
    ) -> None:
        try:
            if fused is not None:  # the three-launch (fused epilogues) or five-launch row-gather layer
                from ds_core.kernels import triton_mlp

                saved_fused = dict(triton_mlp.FUSED)
                triton_mlp.FUSED.update({1: fused, 16: fused})
            mlp = make_mlp(mode, ratio, dev, dtype, base)
            if cfg_kw:
                mlp.sparsity = SparsityConfig(sparse_ratio=ratio, mode=mode, **cfg_kw)
            x = torch.randn(n_tok, D_MODEL, device=dev, dtype=dtype)
            with torch.no_grad():
                got = mlp(x)
                if ratio == 0:
                    ref = reference.swiglu(x, *mlp._weights())
                elif mode == "dynamic":
                    t = mlp.act_threshold
                    ref = reference.dynamic_sparse_swiglu(x, *mlp._weights(), t[0], t[1])
                else:
                    ref = reference.static_sparse_swiglu(
                        x, *mlp._weights(), reference.static_keep(mlp.neuron_score, ratio)
                    )
                if dev == "cuda":
                    sparse = timer(lambda: mlp(x))
                    d = dense_time(n_tok)
                else:  # a shared CPU drifts: interleave dense and sparse calls, same input
                    d, sparse = time_cpu_pair(lambda: dense(x), lambda: mlp(x), args.reps)
            speedup = d["median_us"] / sparse["median_us"]
            row = {
                "case": name, "mode": mode, "ratio": ratio, "tokens": n_tok, "dense": d, "sparse": sparse,
                "speedup": speedup, "target": target, "rel_err_vs_reference": rel_err(got, ref),
                "ideal": 1 / (1 - ratio), "pct_of_ideal": 100 * speedup * (1 - ratio),
                "dense_bw_pct": 100 * dense_bytes / (d["median_us"] * 1e-6) / H100_BW,
            }  # fmt: skip
            if mode == "dynamic" and ratio > 0:
                s_in, s_h, u_in, u_h = skip_fractions(mlp, x)
                rows_read = (1 - u_in) * 2 * D_MODEL * D_FF + (1 - u_h) * D_FF * D_MODEL
                moved = rows_read * torch.finfo(dtype).bits // 8
                row.update(skip_in=s_in, skip_hidden=s_h, union_skip_in=u_in, union_skip_hidden=u_h)
                row["sparse_bw_pct"] = 100 * moved / (sparse["median_us"] * 1e-6) / H100_BW
                # what the layer ran: the row-gather kernels or the dense fallback
                row["path"] = (
                    "gather"
                    if n_tok <= 16 and 1 - ratio**n_tok <= mlp.sparsity.dense_fallback_union
                    else "fallback"
                )
            else:
                moved = reference.static_keep_count(D_FF, ratio) / D_FF * dense_bytes
                row["sparse_bw_pct"] = 100 * moved / (sparse["median_us"] * 1e-6) / H100_BW
            rows.append(row)
            save(args, results)
            print(
                f"{name:34s} dense {d['median_us']:8.1f} us  sparse {sparse['median_us']:8.1f} us  "
                f"{speedup:5.2f}x (target {target})  err {row['rel_err_vs_reference']:.1e}",
                flush=True,
            )
        except Exception as e:
            rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:500]})
            traceback.print_exc()
        finally:
            if fused is not None:
                triton_mlp.FUSED.update(saved_fused)

    for ratio, target in ((0.3, 1.30), (0.5, 1.80), (0.7, 2.70)):
        case(f"dynamic b1 r{ratio}", "dynamic", ratio, 1, target)
    case("ratio 0 b1 (dense module)", "dynamic", 0.0, 1, 1.0)
    if dev == "cuda":  # the layer's other launch plans, same run (FUSED in kernels/triton_mlp.py)
        for fused in (False, "cast", True):
            for ratio in (0.3, 0.5, 0.7):
                case(f"dynamic b1 r{ratio} fused={fused}", "dynamic", ratio, 1, None, fused=fused)
            case(f"dynamic b4 r0.7 fused={fused}", "dynamic", 0.7, 4, None, fused=fused)
    for n_tok in (1, 16, 64):
        case(f"static b{n_tok} r0.3", "static", 0.3, n_tok, 1.25 if n_tok > 1 else None)
    if dev == "cuda":
        for ratio in (0.5, 0.7):
            for n_tok in (2, 4, 8):
                case(f"dynamic b{n_tok} r{ratio} auto", "dynamic", ratio, n_tok, 0.95)
                case(
                    f"dynamic b{n_tok} r{ratio} gather",
                    "dynamic",
                    ratio,
                    n_tok,
                    None,
                    dense_fallback_union=1.0,
                )
        for n_tok in (16, 64, 256):
            case(f"dynamic b{n_tok} r0.5 fallback", "dynamic", 0.5, n_tok, 0.95)
    else:
        for n_tok in (2, 4, 16):
            case(f"dynamic b{n_tok} r0.5", "dynamic", 0.5, n_tok, None)


def save(args, results: dict) -> None:
    save_json(args.out, results)


def bandwidth(results: dict) -> None:
    results["copy_bw_TBs"] = copy_bandwidth_GBs() / 1e3
    print(f"device-to-device copy: {results['copy_bw_TBs']:.2f} TB/s (read + write)", flush=True)


def main() -> int:
    global D_MODEL, D_FF
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--reps", type=int, default=200, help="timed repetitions per case (median reported)")
    p.add_argument("--sweep", action="store_true", help="tune the row-gather kernel launch configs first")
    p.add_argument("--sweep-reps", type=int, default=40)
    p.add_argument("--ratio-sweep", action="store_true", help="time launch configs per ratio (batch 1) first")
    p.add_argument("--out", default="sparse_mlp.json", help="JSON results file")
    p.add_argument(
        "--profile-once", action="store_true", help="one layer call at batch 1, ratio 0.5 (for ncu)"
    )
    p.add_argument("--shape", type=int, nargs=2, help="d_model d_ff", default=[4096, 11008])
    args = p.parse_args()
    D_MODEL, D_FF = args.shape
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_sparse_mlp: error: --device cuda: no CUDA device", file=sys.stderr)
        return 2
    if args.device == "cpu":
        args.reps = min(args.reps, 15)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shape": [D_MODEL, D_FF],
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
    }
    if args.profile_once:
        mlp = make_mlp("dynamic", 0.5, args.device, torch.bfloat16)
        x = torch.randn(1, D_MODEL, device=args.device, dtype=torch.bfloat16)
        with torch.no_grad():
            mlp(x)
            torch.cuda.synchronize()
            mlp(x)
        torch.cuda.synchronize()
        return 0
    if args.device == "cuda":
        import triton

        results["triton"] = triton.__version__
        bandwidth(results)
        if args.sweep:
            sweep(args, results)
            save(args, results)
        if args.ratio_sweep:
            ratio_sweep(args, results)
    else:
        results["threads"] = torch.get_num_threads()
    run_cases(args, results)
    save(args, results)
    print(
        f"\n{'case':34s} {'dense us':>9s} {'sparse us':>9s} {'speedup':>8s} {'target':>6s} {'%ideal':>6s} {'%bw':>5s}"
    )
    for r in results["cases"]:
        if "error" in r:
            print(f"{r['case']:34s} ERROR {r['error'][:80]}")
            continue
        print(
            f"{r['case']:34s} {r['dense']['median_us']:9.1f} {r['sparse']['median_us']:9.1f} {r['speedup']:7.2f}x "
            f"{r['target'] or '':>6} {r['pct_of_ideal']:6.0f} {r['sparse_bw_pct']:5.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
