"""QuantLinear backends in PyTorch on this CPU, ds-1.5b-shaped linears, batch-1 decode (M = 1).

Times the seven linears of one ds-1.5b block: float32 nn.Linear, bfloat16 nn.Linear, and an int4
QuantLinear (group 128) through each backend: ``reference`` (dequantize every call), ``cached``
(dequantize once) and ``int4pack`` (torch._weight_int4pack_mm_for_cpu, bf16 activations).

    python packages/ds-quant/benchmarks/bench_quant_linear.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from ds_quant import QuantLinear, quantize_weight, set_backend

D, KV, FF = 1536, 256, 8960
SHAPES = [(D, D), (KV, D), (KV, D), (D, D), (FF, D), (FF, D), (D, FF)]  # (out, in): q k v o gate up down


def bench(fn, min_time: float) -> float:
    for _ in range(3):
        fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    floats = [nn.Linear(k, n, bias=False) for n, k in SHAPES]
    quants = [QuantLinear.from_packed(quantize_weight(m.weight, 4, 128)) for m in floats]
    x = {k: torch.randn(1, k) for k in (D, FF)}

    def run(layers, dtype=torch.float32):
        def fn():
            for m, (_, k) in zip(layers, SHAPES):
                m(x[k].to(dtype))

        return fn

    rows = {"float32 nn.Linear": bench(run(floats), args.min_time)}
    bf16 = [nn.Linear(k, n, bias=False).to(torch.bfloat16) for n, k in SHAPES]
    rows["bfloat16 nn.Linear"] = bench(run(bf16, torch.bfloat16), args.min_time)
    for backend in ("reference", "cached", "int4pack"):
        with set_backend(backend):
            rows[f"int4 QuantLinear, {backend}"] = bench(run(quants), args.min_time)
    base = rows["float32 nn.Linear"]
    for name, t in rows.items():
        print(f"{name:32s} {1e3 * t:8.2f} ms  x{base / t:5.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {"ms": 1e3 * v, "speedup": base / v} for k, v in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
