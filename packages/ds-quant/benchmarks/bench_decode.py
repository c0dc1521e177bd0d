"""(b) + (c) ds-1.5b shape, random weights: int4 ONNX decode tokens/s vs fp32 ONNX, and file sizes.

One run builds the model (seeded), exports it in float32, quantizes the same weights to int4
(round-to-nearest, group 128, symmetric; tied embedding + lm_head int4 through
GatherBlockQuantized / MatMulNBits), exports that, optionally also a variant with the tied
embedding / lm_head in int8, then times batch-1 greedy decoding of each ONNX model in
onnxruntime on this machine's CPU, one session at a time. File sizes are the bytes of
model.onnx + model.onnx.data.

    python packages/ds-quant/benchmarks/bench_decode.py --work /tmp/dq-1.5b --json out.json
    python packages/ds-quant/benchmarks/bench_decode.py --layers 2 ...   # a quick smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ds_models import ModelConfig, Transformer
from ds_quant import OnnxModel, QuantConfig, export_onnx, quantize
from ds_quant.onnx_export import DATA_FILE, MODEL_FILE


def build(config: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval()


def onnx_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("model.onnx*"))


def export(config: ModelConfig, seed: int, directory: Path, quant: QuantConfig | None, level: int) -> dict:
    t = time.perf_counter()
    model = build(config, seed)
    built = time.perf_counter() - t
    if quant is not None:
        quantize(model, config=quant)
    quantized = time.perf_counter() - t - built
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    export_onnx(model, directory, metadata={"ds.config": json.dumps(config.to_dict())}, accuracy_level=level)
    del model
    gc.collect()
    return {"dir": str(directory), "bytes": onnx_bytes(directory), "build_s": built, "quantize_s": quantized,
            "export_s": time.perf_counter() - t - built - quantized}  # fmt: skip


def with_level(src: Path, dst: Path, level: int) -> Path:
    """A copy of an exported model whose MatMulNBits nodes use another accuracy_level (weights linked)."""
    proto = onnx.load(str(src / MODEL_FILE), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(attrs)
            if level:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    os.symlink((src / DATA_FILE).resolve(), dst / DATA_FILE)
    onnx.save_model(proto, str(dst / MODEL_FILE))
    return dst


def decode_speed(directory: Path, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    t = time.perf_counter()
    om = OnnxModel(directory, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, om.config.vocab_size, (1, prompt_len))
    positions = np.arange(prompt_len)[None]
    t = time.perf_counter()
    logits, past = om.forward(ids, np.ones_like(ids), positions, om.empty_past(1))
    prefill_s = time.perf_counter() - t
    tokens, steps = [], []
    for i in range(new_tokens):
        tok = logits[:, -1].argmax(-1)[:, None]
        tokens.append(int(tok[0, 0]))
        t = time.perf_counter()
        logits, past = om.forward(
            tok, np.ones((1, prompt_len + i + 1), np.int64), np.array([[prompt_len + i]]), past
        )
        steps.append(time.perf_counter() - t)
    del om
    gc.collect()
    decode = steps[2:]  # the first steps pay one-time allocation
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_ms_median": 1e3 * float(np.median(decode)),
            "tokens_per_s": 1.0 / float(np.median(decode)), "tokens": tokens}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", default="/tmp/ds-quant-bench-1.5b", help="where the ONNX models are written")
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (smoke runs)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument(
        "--head-int8", action="store_true", help="also export int4 with an int8 embedding/lm_head"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    overrides = {"n_layers": args.layers} if args.layers else {}
    config = ModelConfig.from_name("ds-1.5b", max_seq_len=4096, **overrides)
    work = Path(args.work)
    result = {"config": config.to_dict(), "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "models": {}}  # fmt: skip
    plans = [("fp32", None, 0), ("int4", QuantConfig(bits=4, group_size=128), 4)]
    if args.head_int8:
        plans.append(
            ("int4 + int8 embed/lm_head", QuantConfig(bits=4, group_size=128, overrides={"lm_head": 8}), 4)
        )
    for name, quant, level in plans:
        info = export(
            config, args.seed, work / (name.split()[0] + ("-h8" if "int8" in name else "")), quant, level
        )
        result["models"][name] = info
        print(f"{name}: {info['bytes'] / 1e9:.3f} GB (export {info['export_s']:.0f}s)", flush=True)
    fp32_bytes = result["models"]["fp32"]["bytes"]
    for info in result["models"].values():
        info["bytes_vs_fp32"] = info["bytes"] / fp32_bytes
    runs = [("fp32", Path(result["models"]["fp32"]["dir"])), ("int4", Path(result["models"]["int4"]["dir"])),
            ("int4, accuracy_level 0", with_level(Path(result["models"]["int4"]["dir"]), work / "int4-level0", 0))]  # fmt: skip
    for name, directory in runs:
        speed = decode_speed(directory, args.prompt_len, args.new_tokens)
        result.setdefault("decode", {})[name] = speed
        print(f"{name}: {speed['tokens_per_s']:.2f} tok/s (median step {speed['decode_ms_median']:.0f} ms, "
              f"load {speed['load_s']:.0f}s, prefill {speed['prefill_s']:.2f}s)", flush=True)  # fmt: skip
    base = result["decode"]["fp32"]["tokens_per_s"]
    for speed in result["decode"].values():
        speed["speedup_vs_fp32"] = speed["tokens_per_s"] / base
    print(json.dumps({k: round(v["speedup_vs_fp32"], 2) for k, v in result["decode"].items()}))
    print(json.dumps({k: round(v["bytes_vs_fp32"], 4) for k, v in result["models"].items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
