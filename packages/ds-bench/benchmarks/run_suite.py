"""The ds-bench suite: ds-small and ds-1.5b across backends, precisions, scenarios and batch sizes.

Everything runs in this one process, one configuration after the other (`ds_bench.runner.run`), then
`ds-bench compare` renders the table and charts. Model directories are built under --work:

  ds-small   --small DIR (a trained one, e.g. ds-trainer's runs/small/model) or random registry weights
  ds-1.5b    random registry weights (the shape of DeepSeek-R1-Distill-Qwen-1.5B)
  int8/int4  ds-quant round-to-nearest (group 128) of those; ONNX exports through ds-quant

    python packages/ds-bench/benchmarks/run_suite.py --plan cpu --out /tmp/suite-cpu [--small DIR]
    python packages/ds-bench/benchmarks/run_suite.py --plan gpu --out $OUT --device cuda

Plans are lists of (model, backend, precision, scenario, batch size); a configuration that fails is
recorded with its error and the suite goes on. Random eval tokens are used unless the model has a
tokenizer and --eval-data is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from ds_bench.compare import markdown_rows, write_charts
from ds_bench.errors import BenchError
from ds_bench.result import write_json_atomic
from ds_bench.runner import RunConfig, run

# (model, backend, precision, scenario, batch) -- precision: fp32 | bf16 | int8 | int4
SMALL_CPU = [
    *[("ds-small", b, "fp32", "offline", bs) for b in ("torch", "onnx", "hf") for bs in (1, 4, 16)],
    ("ds-small", "torch", "bf16", "offline", 16),
    ("ds-small", "hf", "bf16", "offline", 16),
    ("ds-small", "torch", "int8", "offline", 16),
    ("ds-small", "torch", "int4", "offline", 16),
    ("ds-small", "onnx", "int8", "offline", 16),
    ("ds-small", "onnx", "int4", "offline", 16),
    ("ds-small", "torch", "fp32", "singlestream", 1),
    ("ds-small", "torch", "fp32", "server", 8),
    ("ds-small", "onnx", "int4", "singlestream", 1),
    ("ds-small", "hf", "fp32", "singlestream", 1),
]
BIG_CPU = [
    ("ds-1.5b", "torch", "fp32", "offline", 2),
    ("ds-1.5b", "hf", "fp32", "offline", 2),
    ("ds-1.5b", "onnx", "int4", "offline", 2),
    ("ds-1.5b", "torch", "bf16", "offline", 2),
    ("ds-1.5b", "hf", "bf16", "offline", 2),
    ("ds-1.5b", "torch", "int8", "offline", 2),
    ("ds-1.5b", "torch", "int4", "offline", 2),
    ("ds-1.5b", "onnx", "int8", "offline", 2),
    ("ds-1.5b", "onnx", "fp32", "offline", 2),  # a 6 GB graph (external data): last
]
GPU = [
    *[("ds-1.5b", b, "bf16", "offline", bs) for b in ("torch", "hf") for bs in (1, 8, 32)],
    ("ds-1.5b", "torch-fast", "bf16", "singlestream", 1),
    ("ds-1.5b", "hf", "bf16", "singlestream", 1),
    ("ds-1.5b", "torch", "int8", "offline", 8),
]
# The cells the first H100 run left open, most wanted first (a time limit cuts the tail).
GPU_FILL = [
    ("ds-1.5b", "torch-fast", "bf16", "server", 1),  # batch 1: one compiled decode graph serves it
    ("ds-1.5b", "torch", "int4", "offline", 8),
    *[("ds-small", b, p, "offline", 8) for p in ("bf16", "fp32") for b in ("torch", "hf")],
    ("ds-small", "torch", "int8", "offline", 8),
    ("ds-small", "torch", "int4", "offline", 8),
    ("ds-small", "torch-fast", "bf16", "singlestream", 1),
    ("ds-1.5b", "torch", "fp32", "offline", 8),
    ("ds-1.5b", "hf", "fp32", "offline", 8),
    ("ds-1.5b", "torch-fast", "int4", "singlestream", 1),
]
PLANS = {
    "cpu": SMALL_CPU + BIG_CPU,
    "cpu-small": SMALL_CPU,
    "cpu-big": BIG_CPU,
    "gpu": GPU + GPU_FILL,
    "gpu-fill": GPU_FILL,
}

# Workload per model: short generations on CPU for ds-1.5b (fp32 decode on 2 cores is ~1 token/s).
WORKLOAD = {
    ("cpu", "ds-small"): dict(samples=32, prompt_len=32, gen_tokens=16, eval_tokens=2048, eval_seq_len=128),
    ("cpu", "ds-1.5b"): dict(samples=4, prompt_len=16, gen_tokens=4, eval_tokens=64, eval_seq_len=64),
    ("cuda", "ds-small"): dict(samples=64, prompt_len=128, gen_tokens=32, eval_tokens=4096, eval_seq_len=256),
    ("cuda", "ds-1.5b"): dict(samples=64, prompt_len=128, gen_tokens=16, eval_tokens=1024, eval_seq_len=256),
}


def config_name(model: str, backend: str, precision: str, scenario: str, bs: int) -> str:
    return f"{model}-{backend}-{precision}-{scenario}-bs{bs}"


def log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_models(work: Path, needed: set[tuple[str, str, str]], small: str | None, device: str) -> dict:
    """{(model, precision, kind): directory}; kind is "torch" (ds model dir) or "onnx" (export)."""
    from ds_models import Transformer

    dirs: dict[tuple[str, str, str], Path] = {}
    for name in sorted({m for m, _, _ in needed}):
        float_dir = work / name
        if name == "ds-small" and small:
            float_dir = Path(small)
        elif not (float_dir / "config.yaml").exists():
            log(f"building {name} (random weights)")
            torch.manual_seed(0)
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            model = Transformer.from_pretrained(name, dtype=dtype)  # registry name: seeded random init
            model.save_pretrained(float_dir, provenance={"weights": "random (registry init, seed 0)"})
            del model
            gc.collect()
        for precision in sorted({p for m, p, _ in needed if m == name}):
            kinds = {k for m, p, k in needed if m == name and p == precision}
            src = float_dir
            if precision in ("int8", "int4"):
                src = work / f"{name}-{precision}"
                if not (src / "quant.yaml").exists():
                    log(f"quantizing {name} to {precision}")
                    from ds_quant.checkpoint import save_quantized
                    from ds_quant.quantize import quantize

                    model = Transformer.from_pretrained(float_dir, device=device, dtype=torch.float32)
                    tok = float_dir / "tokenizer.json"
                    save_quantized(
                        quantize(model, bits=int(precision[3:]), group_size=128),
                        src,
                        tokenizer=tok if tok.exists() else None,
                        force=True,
                    )
                    del model
                    gc.collect()
            if "torch" in kinds:
                dirs[(name, precision, "torch")] = src
            if "onnx" in kinds:
                out = work / f"{name}-{precision}-onnx"
                if not (out / "model.onnx").exists():
                    log(f"exporting {name} {precision} to ONNX")
                    from ds_quant.onnx_export import export_directory

                    export_directory(src, out, force=True)
                dirs[(name, precision, "onnx")] = out
    return dirs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="/tmp/ds-bench-suite", help="where model directories are built")
    p.add_argument("--out", required=True, help="directory for result JSONs, table.md and charts")
    p.add_argument("--small", help="a trained ds-small model directory")
    p.add_argument(
        "--eval-data", help="evaluation text for models with a tokenizer (e.g. ds-data's validation split)"
    )
    p.add_argument("--only", help="comma-separated substrings: run only matching configurations")
    p.add_argument("--min-duration", type=float, default=1.0)
    p.add_argument("--threads", type=int, help="CPU threads for torch / onnxruntime (default: theirs)")
    args = p.parse_args()

    plan = PLANS[args.plan]
    if args.only:
        keys = args.only.split(",")
        plan = [c for c in plan if any(k in config_name(*c) for k in keys)]
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if args.device.startswith("cuda") else "cpu"

    results, failures = [], []
    for model, backend, precision, scenario, bs in plan:
        name = config_name(model, backend, precision, scenario, bs)
        kind = "onnx" if backend == "onnx" else "torch"
        try:  # built on first use (idempotent), so a time limit cuts the last configurations, not all
            model_dir = build_models(work, {(model, precision, kind)}, args.small, args.device)[
                (model, precision, kind)
            ]
        except Exception as e:
            traceback.print_exc()
            failures.append({"config": name, "error": f"build: {type(e).__name__}: {e}"})
            continue
        trained = model == "ds-small" and args.small
        label = f"{model}{'' if trained or model != 'ds-small' else ' (random)'} {backend} {precision} {scenario} bs{bs}"
        cfg = RunConfig(
            model=str(model_dir), backend=backend, scenario=scenario, device=args.device,
            dtype=None if precision in ("int8", "int4") or backend == "onnx" else precision,
            batch_size=bs, min_duration=args.min_duration, label=label, threads=args.threads,
            **WORKLOAD[(dev, model)],
            eval_data=args.eval_data if (model_dir / "tokenizer.json").exists() else None,
        )  # fmt: skip
        log(f"run {name}")
        t = time.time()
        try:
            result = run(cfg, log_dir=out / "loadgen" / name)
        except Exception as e:  # record and go on: one broken configuration should not void the suite
            traceback.print_exc()
            failures.append({"config": name, "error": f"{type(e).__name__}: {e}"})
            continue
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        write_json_atomic(out / f"{name}.json", result)
        results.append(result)
        m = result["metrics"]
        log(
            f"  {result['loadgen']['result']} in {time.time() - t:.0f}s: {m['tokens_per_s']['value']:.1f} tok/s, "
            f"p50 {m['latency_p50']['value']:.1f} ms, ppl {m['perplexity']['value']:.1f}"
        )
    if results:
        table = markdown_rows(results)
        (out / "table.md").write_text(table + "\n")
        try:
            for png in write_charts(results, out):
                log(f"chart {png}")
        except BenchError as e:  # no matplotlib on this machine: `ds-bench compare --charts` later
            log(f"no charts: {e}")
    (out / "failures.json").write_text(json.dumps(failures, indent=1))
    log(f"{len(results)} results, {len(failures)} failures -> {out}")
    return 0 if results else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
