"""Benchmark: train the aligner on the built-in dataset on CPU, evaluate on the held-out test split.

Prints the retrieval / zero-shot table (calibration off and on, same trained model) and writes the
numbers as JSON. Targets (issue 9): text->image R@1 >= 0.9, text->video >= 0.8, text->audio >= 0.7.

    python packages/ds-multimodal/benchmarks/train_eval.py --out /tmp/mm-bench [key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from ds_multimodal.cli import parse_overrides
from ds_multimodal.data import load_digits_multimodal
from ds_multimodal.retrieval import evaluate, format_table
from ds_multimodal.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="mm-bench", help="directory for results.json and the model")
    ap.add_argument("overrides", nargs="*", help="TrainConfig key=value overrides")
    args = ap.parse_args()
    cfg = TrainConfig(**parse_overrides(args.overrides))
    torch.set_num_threads(cfg.num_threads)  # train() does this itself; here for the evaluation too
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model, history = train(cfg, progress=False)
    results = evaluate(model, load_digits_multimodal("test", seed=cfg.seed, cache_dir=cfg.cache_dir or None))
    load_after = os.getloadavg()
    out = Path(args.out)
    model.save_pretrained(out / "model", provenance={"command": "benchmarks/train_eval.py"})
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}",
        "load_average_1_5_15_min_before": load_before,
        "load_average_1_5_15_min_after": load_after,
        "config": cfg.to_dict(),
        "train_seconds": history["train_seconds"],
        "calibration_seconds": history["calibration_seconds"],
        "calibration_report": history["calibration"],
        "total_seconds": time.perf_counter() - t0,
        "final_loss": history["loss"][-1],
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k not in ("results", "config")}, indent=2))
    print(format_table(results))


if __name__ == "__main__":
    main()
