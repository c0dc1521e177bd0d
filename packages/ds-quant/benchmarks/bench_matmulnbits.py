"""(a) A stack of ds-1.5b-shaped linears in onnxruntime: int4 MatMulNBits (block 128) vs fp32 MatMul.

Each "layer" is the seven linears of a ds-1.5b block wired like the block (q, k, v and gate/up read
x; o reads q; down reads silu(gate) * up; both add back into x), so the graph reads every weight
once per token. Weights are random; the int4 tensors come from ds_quant.quantize_weight (the same
bytes `ds-quant export` writes). Batch-1 decode (M = 1) is what the issue's 3.15x refers to; a
few larger M are reported too.

    python packages/ds-quant/benchmarks/bench_matmulnbits.py --layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from ds_quant import quantize_weight

D, KV, FF = 1536, 256, 8960  # ds-1.5b: d_model, n_kv_heads * head_dim, d_ff
SHAPES = {
    "q": (D, D),
    "k": (KV, D),
    "v": (KV, D),
    "o": (D, D),
    "gate": (FF, D),
    "up": (FF, D),
    "down": (D, FF),
}


def build(layers: int, bits: int | None, block: int, sym: bool, accuracy_level: int, seed: int = 0):
    """The graph and its weight bytes; bits None = fp32 MatMul."""
    gen = torch.Generator().manual_seed(seed)
    nodes, inits, weight_bytes = [], [], 0

    def linear(x: str, name: str, out: str) -> None:
        nonlocal weight_bytes
        n, k = SHAPES[name.split(".")[-1]]
        w = torch.randn(n, k, generator=gen) * 0.02
        if bits is None:
            t = numpy_helper.from_array(w.t().contiguous().numpy(), f"{name}.w")
            inits.append(t)
            weight_bytes += w.numel() * 4
            nodes.append(helper.make_node("MatMul", [x, t.name], [out]))
            return
        p = quantize_weight(w, bits, block, sym)
        tensors = [numpy_helper.from_array(p.qweight.numpy(), f"{name}.qweight"),
                   numpy_helper.from_array(p.scales.reshape(-1).numpy(), f"{name}.scales")]  # fmt: skip
        if p.zero_points is not None:
            tensors.append(numpy_helper.from_array(p.zero_points.numpy(), f"{name}.zero_points"))
        inits.extend(tensors)
        weight_bytes += p.nbytes()
        attrs = dict(K=k, N=n, bits=bits, block_size=block)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(
            helper.make_node(
                "MatMulNBits", [x, *[t.name for t in tensors]], [out], domain="com.microsoft", **attrs
            )
        )

    x = "x"
    for i in range(layers):
        p = f"l{i}"
        for name in ("q", "k", "v", "gate", "up"):
            linear(x, f"{p}.{name}", f"{p}.{name}_out")
        linear(f"{p}.q_out", f"{p}.o", f"{p}.o_out")
        nodes += [
            helper.make_node("Sigmoid", [f"{p}.gate_out"], [f"{p}.sig"]),
            helper.make_node("Mul", [f"{p}.gate_out", f"{p}.sig"], [f"{p}.silu"]),
            helper.make_node("Mul", [f"{p}.silu", f"{p}.up_out"], [f"{p}.h"]),
        ]
        linear(f"{p}.h", f"{p}.down", f"{p}.down_out")
        # k and v feed the cache in the real block; fold them into the output so they are not pruned.
        nodes += [
            helper.make_node("Add", [x, f"{p}.o_out"], [f"{p}.r1"]),
            helper.make_node("Add", [f"{p}.r1", f"{p}.down_out"], [f"{p}.r2"]),
            helper.make_node("Concat", [f"{p}.k_out", f"{p}.v_out"], [f"{p}.kv"], axis=-1),
        ]
        x = f"{p}.r2"
    kv_outs = [helper.make_tensor_value_info(f"l{i}.kv", TensorProto.FLOAT, None) for i in range(layers)]
    graph = helper.make_graph(
        nodes, "linear_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", D])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", D]), *kv_outs], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return model, weight_bytes


def time_session(model: onnx.ModelProto, m: int, min_time: float) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((m, D), dtype=np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="ds-1.5b blocks worth of linears")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16], help="rows of x (1 = decode)")
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    variants = [("fp32 MatMul", None, True, 0), ("int4 MatMulNBits sym", 4, True, 0),
                ("int4 MatMulNBits asym", 4, False, 0), ("int4 MatMulNBits sym, accuracy_level 4", 4, True, 4)]  # fmt: skip
    rows = []
    base_bytes, base_time = None, {}
    for label, bits, sym, level in variants:
        model, nbytes = build(args.layers, bits, args.block, sym, level)
        base_bytes = base_bytes or nbytes
        for m in args.m:
            t = time_session(model, m, args.min_time)
            base_time.setdefault(m, t)
            rows.append({"variant": label, "M": m, "ms": 1e3 * t, "speedup": base_time[m] / t,
                         "weight_MB": nbytes / 1e6, "bytes_vs_fp32": nbytes / base_bytes})  # fmt: skip
            print(f"{label:42s} M={m:<3d} {1e3 * t:8.2f} ms  x{base_time[m] / t:5.2f}  "
                  f"{nbytes / 1e6:8.1f} MB ({100 * nbytes / base_bytes:.1f}% of fp32)", flush=True)  # fmt: skip
    info = {"cpu": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
            "threads": torch.get_num_threads(), "layers": args.layers, "block": args.block, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
