"""The main job, end to end: raw text to a benchmarked int4 ONNX model, on CPU.

    hatch run quickstart                 # ds-small, a few minutes on a laptop CPU
    hatch run quickstart --mini          # ds-tiny, seconds (what CI runs)
    python examples/quickstart.py --out runs/quickstart

Each stage is the command a user would type, run as a subprocess and echoed first:

    1. ds-train     train a byte-level BPE tokenizer and ds-small (static sparse MLP, sparse_ratio 0.3)
                    on ds-data's built-in corpus
    2. ds-quant     quantize to int4 with GPTQ (calibrated on the corpus), export fp32 and int4 ONNX
                    models with a KV cache, verify onnxruntime against PyTorch
    3. ds-quant     evaluate perplexity / next-token accuracy on the held-out split
    4. ds-bench     Offline LoadGen scenario on both ONNX models in onnxruntime
    5. summary      table (stdout + summary.md), chart (summary.png), summary.json, provenance.json

Every artefact lands in one output directory; the summary numbers are read back from the artefacts
the tools wrote, never re-typed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_CONFIG = HERE.parent / "packages" / "ds-trainer" / "configs" / "small.yaml"

# Sizes: the full run trains ds-small; --mini trains ds-tiny for a handful of steps (CI).
FULL = {
    "train": ["model.path=ds-small"],  # configs/small.yaml as it is: 60 steps of 8 x 64 tokens
    "eval_windows": "64",
    "bench": [
        "--samples",
        "16",
        "--prompt-len",
        "32",
        "--gen-tokens",
        "16",
        "--min-query-count",
        "16",
        "--min-duration",
        "1",
    ],
}
MINI = {
    "train": [
        "model.path=ds-tiny",
        "schedule.steps=4",
        "schedule.warmup_steps=1",
        "data.seq_len=32",
        "checkpoint.every=4",
        "eval.every=4",
        "eval.max_batches=1",
        "logging.every=1",
    ],
    "eval_windows": "4",
    "bench": [
        "--samples",
        "4",
        "--prompt-len",
        "8",
        "--gen-tokens",
        "4",
        "--min-query-count",
        "4",
        "--min-duration",
        "0.2",
    ],
}


class QuickstartError(RuntimeError):
    """A stage failed; the message names the stage and its command."""


def tool(name: str) -> str:
    """The console script installed beside this interpreter (hatch puts them in the env's bin/)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run(stage: str, argv: list[str], log: list[dict]) -> None:
    print(f"\n\033[1m[{stage}]\033[0m $ {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, check=False)
    seconds = time.perf_counter() - t0
    log.append(
        {"stage": stage, "command": shlex.join(argv), "seconds": round(seconds, 2), "exit": proc.returncode}
    )
    if proc.returncode != 0:
        raise QuickstartError(f"{stage}: `{shlex.join(argv)}` exited {proc.returncode}")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pipeline(out: Path, mini: bool) -> dict:
    size = MINI if mini else FULL
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    train_dir, int4_dir = out / "train", out / "int4"
    onnx_fp32, onnx_int4 = out / "onnx-fp32", out / "onnx-int4"
    model_dir = train_dir / "model"

    # 1. tokenizer + ds-small with a static sparse MLP (the saving survives any batch size)
    run(
        "train",
        [
            tool("ds-train"),
            str(TRAIN_CONFIG),
            f"output_dir={train_dir}",
            "model.overrides.sparse_ratio=0.3",
            "model.overrides.sparsity_mode=static",
            *size["train"],
        ],
        log,
    )

    # 2. int4 GPTQ on the corpus, then both ONNX exports and the parity checks
    run(
        "quantize",
        [
            tool("ds-quant"),
            "quantize",
            "--model",
            str(model_dir),
            "--out",
            str(int4_dir),
            "--bits",
            "4",
            "--method",
            "gptq",
            "--calib",
            "builtin",
            "--force",
        ],
        log,
    )
    run(
        "export fp32",
        [
            tool("ds-quant"),
            "export",
            "--onnx",
            "--model",
            str(model_dir),
            "--out",
            str(onnx_fp32),
            "--bits",
            "32",
            "--force",
        ],
        log,
    )
    run(
        "export int4",
        [tool("ds-quant"), "export", "--onnx", "--model", str(int4_dir), "--out", str(onnx_int4), "--force"],
        log,
    )
    run("verify fp32", [tool("ds-quant"), "verify", "--onnx", str(onnx_fp32)], log)
    run("verify int4", [tool("ds-quant"), "verify", "--onnx", str(onnx_int4)], log)

    # 3. held-out perplexity and next-token accuracy: PyTorch fp32 and both ONNX models
    eval_json = out / "eval.json"
    run(
        "evaluate",
        [
            tool("ds-quant"),
            "eval",
            "--model",
            str(model_dir),
            "--bits",
            "32",
            "--onnx",
            str(onnx_fp32),
            str(onnx_int4),
            "--max-windows",
            size["eval_windows"],
            "--json",
            str(eval_json),
        ],
        log,
    )

    # 4. ds-bench, Offline scenario through MLPerf LoadGen, both models in onnxruntime
    bench = {}
    for name, d in (("fp32", onnx_fp32), ("int4", onnx_int4)):
        result = out / f"bench-{name}.json"
        run(
            f"bench {name}",
            [
                tool("ds-bench"),
                "run",
                "--model",
                str(d),
                "--backend",
                "onnx",
                "--scenario",
                "offline",
                "--label",
                f"ds-small {name} (onnx)",
                *size["bench"],
                "--out",
                str(result),
                "--quiet",
            ],
            log,
        )
        bench[name] = result
    run(
        "compare",
        [
            tool("ds-bench"),
            "compare",
            str(bench["fp32"]),
            str(bench["int4"]),
            "--markdown",
            str(out / "bench.md"),
        ],
        log,
    )

    return summarize(out, mini, model_dir, eval_json, bench, {"fp32": onnx_fp32, "int4": onnx_int4}, log)


def summarize(
    out: Path, mini: bool, model_dir: Path, eval_json: Path, bench: dict, onnx: dict, log: list
) -> dict:
    """Read every number back from the artefacts the tools wrote."""
    metrics = [
        json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines() if line
    ]
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    eval_losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    evals = {row["name"]: row for row in json.loads(eval_json.read_text())}
    rows = {}
    for name in ("fp32", "int4"):
        ev = evals[f"onnx {onnx[name].name}"]
        result = json.loads(bench[name].read_text())
        rows[name] = {
            "onnx_bytes": dir_bytes(onnx[name]),
            "perplexity": ev["perplexity"],
            "next_token_accuracy": ev["accuracy"],
            "tokens_per_s": result["metrics"]["tokens_per_s"]["value"],
            "loadgen": result.get("loadgen", {}).get("result"),
        }
    rows["int4"]["size_vs_fp32"] = rows["int4"]["onnx_bytes"] / rows["fp32"]["onnx_bytes"]
    rows["int4"]["perplexity_vs_fp32"] = rows["int4"]["perplexity"] / rows["fp32"]["perplexity"] - 1
    rows["int4"]["speed_vs_fp32"] = rows["int4"]["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
    summary = {
        "mini": mini,
        "model": str(model_dir),
        "train": {
            "first_loss": train_losses[0],
            "final_loss": train_losses[-1],
            "final_eval_loss": eval_losses[-1] if eval_losses else None,
            "steps": len(train_losses),
        },
        "torch_fp32": {k: evals["float32"][k] for k in ("perplexity", "accuracy")},
        "onnx": rows,
        "stages": log,
    }
    table = [
        "| model | ONNX size (MB) | size vs fp32 | perplexity | next-token acc | tokens/s (onnxruntime, Offline) | LoadGen |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        ratio = f"{100 * r['onnx_bytes'] / rows['fp32']['onnx_bytes']:.1f}%"
        table.append(
            f"| {name} | {r['onnx_bytes'] / 1e6:.2f} | {ratio} | {r['perplexity']:.2f} | "
            f"{100 * r['next_token_accuracy']:.2f}% | {r['tokens_per_s']:.1f} | {r['loadgen']} |"
        )
    head = (
        f"Training loss {summary['train']['first_loss']:.3f} → {summary['train']['final_loss']:.3f} "
        f"over {summary['train']['steps']} logged steps; held-out perplexity (PyTorch fp32) "
        f"{summary['torch_fp32']['perplexity']:.2f}."
    )
    text = head + "\n\n" + "\n".join(table) + "\n"
    write_atomic(out / "summary.md", text)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    chart(out / "summary.png", rows)
    provenance = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "stages": log,
        "model_provenance": json.loads((model_dir / "provenance.json").read_text()),
        "artefacts": sorted(str(p.relative_to(out)) for p in out.iterdir()),
    }
    write_atomic(out / "provenance.json", json.dumps(provenance, indent=2) + "\n")
    print("\n" + text)
    print(f"Artefacts: {out} (summary.md, summary.png, summary.json, provenance.json)")
    return summary


def chart(path: Path, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("ONNX size (MB)", "onnx_bytes", 1e-6),
        ("perplexity", "perplexity", 1.0),
        ("tokens/s", "tokens_per_s", 1.0),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.2))
    for ax, (title, key, scale) in zip(axes, panels):
        names = list(rows)
        values = [rows[n][key] * scale for n in names]
        ax.bar(names, values, color=["#4c72b0", "#dd8452"])
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=9)
    fig.suptitle("ds quickstart: fp32 vs int4 (onnxruntime, CPU)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="quickstart",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="runs/quickstart", help="output directory for every artefact")
    parser.add_argument("--mini", action="store_true", help="ds-tiny for a few steps (seconds; what CI runs)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        pipeline(Path(args.out).resolve(), args.mini)
    except QuickstartError as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 1
    print(f"Done in {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
