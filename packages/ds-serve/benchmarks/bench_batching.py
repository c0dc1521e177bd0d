"""Continuous vs fixed batching: 100 concurrent clients against a real ds-serve process.

Builds ds-small with random weights (and a small byte-level tokenizer) in a temporary directory,
starts `ds-serve` once per batching mode on loopback, and lets N clients (asyncio + httpx) each send
R completion requests back to back (closed loop). Every request has a random prompt length and a
random output length (ignore_eos, so the length is exact); the same workload, seeded, goes to both
modes. Reports per-request latency mean / std / p50 / p99, throughput in tokens/s, and the share
of requests within a p99 latency target.

    python packages/ds-serve/benchmarks/bench_batching.py --clients 100 --requests 2 --max-batch 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(path: Path, name: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ds_models import ModelConfig, Transformer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["a small corpus for a benchmark tokenizer"] * 10, trainer)
    torch.manual_seed(0)
    Transformer(ModelConfig.from_name(name)).save_pretrained(path, tokenizer=tok)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def run_load(url: str, workload: list[list[tuple[list[int], int]]]) -> dict:
    latencies, tokens = [], 0

    async def client(jobs, http):
        nonlocal tokens
        for prompt, n in jobs:
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json={"model": "bench", "prompt": prompt,
                                "max_tokens": n, "temperature": 0, "ignore_eos": True})  # fmt: skip
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(workload) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(jobs, http) for jobs in workload))
        wall = time.perf_counter() - t0
    return {
        "requests": len(latencies), "wall_s": wall, "tokens_per_s": tokens / wall,
        "latency_mean_s": statistics.mean(latencies), "latency_std_s": statistics.pstdev(latencies),
        "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "latencies": latencies,
    }  # fmt: skip


def serve(model_dir: Path, batching: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ds_serve", "--model", str(model_dir), "--model-name", "bench",
           "--port", str(port), "--max-batch", str(args.max_batch), "--batching", batching,
           "--max-queue", "100000", "--batch-wait", str(args.batch_wait)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="ds-small", help="registry name, built with random weights")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait", type=float, default=0.05)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 64))
    p.add_argument("--output-len", type=int, nargs=2, default=(4, 96))
    p.add_argument("--p99-target", type=float, default=None,
                   help="latency target in s (default: the continuous run's p99)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    rng = random.Random(0)
    workload = [[([rng.randrange(256) for _ in range(rng.randint(*args.prompt_len))], rng.randint(*args.output_len))
                 for _ in range(args.requests)] for _ in range(args.clients)]  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.model)
        for batching in ("continuous", "fixed"):
            proc, url = serve(model_dir, batching, args)
            try:
                asyncio.run(run_load(url, [[(list(range(1, 9)), 4)]] * 4))  # warm-up
                results[batching] = asyncio.run(run_load(url, workload))
            finally:
                proc.terminate()
                proc.wait()
    target = args.p99_target or results["continuous"]["latency_p99_s"]
    for r in results.values():
        r["within_target"] = sum(x <= target for x in r["latencies"]) / len(r["latencies"])
    cont, fixed = results["continuous"], results["fixed"]
    summary = {
        "model": args.model, "clients": args.clients, "requests_per_client": args.requests,
        "max_batch": args.max_batch, "torch_threads": torch.get_num_threads() if args.threads is None else args.threads,
        "cpu": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "p99_target_s": target,
        "std_reduction": 1 - cont["latency_std_s"] / fixed["latency_std_s"],
        "throughput_ratio": cont["tokens_per_s"] / fixed["tokens_per_s"],
        **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items() if m != "latencies"},
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
