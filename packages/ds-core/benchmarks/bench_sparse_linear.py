"""DynamicSparseLinear (bf16) vs dense ``F.linear`` (cuBLAS), side by side in one run.

Shapes of ds-7b: the fused q/k/v projection 4096 -> 12288 and o_proj 4096 -> 4096. Cases:
dynamic batch 1 at ratio 0.3 / 0.5 (the row-gather kernel), the same with the bias and cast
fused into the GEMV (``FUSED_CAST``), a few launch configs of the gather kernel at batch 1, and
batch 16 at ratio 0.5 (the masked-dense fallback: must not lose to dense). Thresholds are
calibrated on random activations, so each token skips about ``ratio`` of its inputs.

Timing is ``timing.py``'s (the SparseMLP table's method): each op captured in a CUDA graph, the
50 MB L2 flushed by writing 256 MB before every replay, CUDA events around each replay, median.

    PYTHONPATH=packages/ds-core/src python3 packages/ds-core/benchmarks/bench_sparse_linear.py --out sparse_linear.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from timing import rel_err, save_json, time_gpu

from ds_core import DynamicSparseLinear, SparsityConfig
from ds_core.kernels import reference

SL = importlib.import_module("ds_core.sparse_linear")
SHAPES = {"qkv 4096x12288": (4096, 12288), "o_proj 4096x4096": (4096, 4096)}
H100_BW = 3.35e12  # bytes/s, datasheet HBM3
DEVICE = "cuda"  # a smoke test of the script may set "cpu" (TRITON_INTERPRET=1, tiny SHAPES)


def make(d_in: int, d_out: int, ratio: float) -> DynamicSparseLinear:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        m = DynamicSparseLinear(d_in, d_out, bias=False, sparsity=SparsityConfig(sparse_ratio=ratio))
        m = m.to(torch.bfloat16).eval()
    if ratio > 0:
        m.calibrate(torch.randn(256, d_in, device=DEVICE, dtype=torch.bfloat16))
    return m


def run(args, results: dict) -> None:
    rows = results.setdefault("cases", [])
    from ds_core.kernels import triton_mlp as T

    for shape_name, (d_in, d_out) in SHAPES.items():
        dense_bytes = d_in * d_out * 2
        dense_cache: dict[int, dict] = {}
        for ratio, n_tok, variant in [
            (0.3, 1, "gather"), (0.5, 1, "gather"), (0.3, 1, "fused_cast"), (0.5, 1, "fused_cast"),
            (0.5, 1, "cfg 64/32/128/2"), (0.5, 1, "cfg 64/32/512/2"), (0.5, 1, "cfg 128/32/256/4"),
            (0.5, 4, "gather"), (0.5, 16, "fallback"), (0.0, 1, "ratio 0"),
        ]:  # fmt: skip
            name = f"{shape_name} b{n_tok} r{ratio} {variant}"
            try:
                m = make(d_in, d_out, ratio)
                x = torch.randn(n_tok, d_in, device=DEVICE, dtype=torch.bfloat16)
                w = m.weight.detach()
                if n_tok not in dense_cache:
                    with torch.no_grad():
                        dense_cache[n_tok] = time_gpu(lambda x=x, w=w: F.linear(x, w), args.reps)
                d = dense_cache[n_tok]
                with torch.no_grad():
                    if variant.startswith("cfg"):
                        bn, bk, ks, nw = (int(v) for v in variant.split()[1].split("/"))
                        cfg = T.GatherConfig(bn, bk, ks, nw, 1)
                        wt, t = m.transposed_weight(), m.act_threshold

                        def fn(x=x, wt=wt, t=t, cfg=cfg, ratio=ratio):
                            return SL._gather_linear(x, wt, t, None, ratio, config=cfg)
                    elif variant == "fused_cast":
                        wt, t = m.transposed_weight(), m.act_threshold

                        def fn(x=x, wt=wt, t=t, ratio=ratio):
                            return SL._gather_linear(x, wt, t, None, ratio, fused_cast=True)
                    else:

                        def fn(x=x, m=m):
                            return m(x)

                    got = fn()
                    t = m.act_threshold if ratio > 0 else float("-inf")
                    ref = F.linear(reference.sparsify(x, t).float(), w.float())
                    sparse = time_gpu(fn, args.reps)
                speedup = d["median_us"] / sparse["median_us"]
                row = {
                    "case": name, "shape": [d_in, d_out], "ratio": ratio, "tokens": n_tok, "variant": variant,
                    "dense": d, "sparse": sparse, "speedup": speedup, "rel_err_vs_reference": rel_err(got, ref),
                    "ideal": 1 / (1 - ratio), "pct_of_ideal": 100 * speedup * (1 - ratio),
                    "dense_bw_pct": 100 * dense_bytes / (d["median_us"] * 1e-6) / H100_BW,
                }  # fmt: skip
                if ratio > 0:
                    active = (x.abs().float() > m.act_threshold.float()).any(0).float().mean().item()
                    row["rows_read"] = active
                    row["sparse_bw_pct"] = 100 * active * dense_bytes / (sparse["median_us"] * 1e-6) / H100_BW
                rows.append(row)
                save_json(args.out, results)
                print(
                    f"{name:42s} dense {d['median_us']:7.1f} us  sparse {sparse['median_us']:7.1f} us  "
                    f"{speedup:5.2f}x  ideal% {row['pct_of_ideal']:4.0f}  err {row['rel_err_vs_reference']:.1e}",
                    flush=True,
                )
            except Exception as e:
                rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:500]})
                traceback.print_exc()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reps", type=int, default=200, help="timed repetitions per case (median reported)")
    p.add_argument("--out", default="sparse_linear.json", help="JSON results file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparse_linear: error: no CUDA device", file=sys.stderr)
        return 2
    import triton

    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
    }
    run(args, results)
    save_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
