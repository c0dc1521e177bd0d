"""Continuous vs fixed batching against a real ds-serve process: closed loop and LoadGen Server.

Builds a registry model (ds-small by default) with random weights and a small tokenizer in a
temporary directory, and starts `ds-serve` once per batching mode with the same KV-cache rows
(--max-batch): the baseline gets the same memory, and only the scheduling differs. Every request
has a random prompt and a random, exact output length (ignore_eos); both modes get the same
seeded requests in the same order.

1. Closed loop, `--clients` concurrent clients (100): each sends its next request as soon as the
   last is answered, for `--duration` seconds. Statistics are taken in the steady state only:
   requests sent after `--warmup` seconds and answered before the clients stop, so that neither
   the start-up burst (everyone queued at t=0) nor the drain at the end (the load falling) is
   counted. Latency = client-side send to complete response.
2. MLPerf LoadGen Server scenario (open loop, Poisson arrivals at a target QPS), through
   mlcommons-loadgen with ds-bench's settings and log reader (ds_bench.scenarios). Each query is
   sent to the server the moment LoadGen issues it (ds-bench's own SUT serves one static batch
   at a time, which would impose fixed batching on the server). QPS is swept over fractions of
   the continuous closed-loop rate; "throughput at a p99 target" is the highest swept QPS whose
   p99 latency stays within the target. The default target is twice the p99 that fixed batching
   itself reaches at the lowest QPS, an SLO the baseline meets comfortably when lightly loaded.

    python packages/ds-serve/benchmarks/bench_batching.py --out result.json
    python packages/ds-serve/benchmarks/bench_batching.py --model ds-1.5b --device cuda --dtype bf16 \\
        --max-batch 64 --max-len 512 --no-loadgen
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
import threading
import time
from pathlib import Path

import httpx
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(path: Path, name: str, device: str, dtype: str | None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ds_models import ModelConfig, Transformer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["a small corpus for a benchmark tokenizer"] * 10, trainer)
    torch.manual_seed(0)
    with torch.device(device):  # a 1.5B model initialises in seconds on the GPU, minutes on the CPU
        model = Transformer(ModelConfig.from_name(name))
    if dtype:
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    model.to("cpu").save_pretrained(path, tokenizer=tok)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def stats(latencies: list[float], tokens: list[int]) -> dict:
    """Latency statistics, plus normalized latency (latency / output tokens, the vLLM paper's measure)."""
    norm = [t / max(k, 1) for t, k in zip(latencies, tokens)]
    return {"n": len(latencies), "latency_mean_s": statistics.mean(latencies),
            "latency_std_s": statistics.pstdev(latencies), "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99), "norm_latency_mean_s": statistics.mean(norm),
            "norm_latency_std_s": statistics.pstdev(norm)}  # fmt: skip


async def complete(http: httpx.AsyncClient, url: str, prompt: list[int], n: int) -> int:
    r = await http.post(url + "/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": n,
                                                       "temperature": 0, "ignore_eos": True})  # fmt: skip
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def closed_loop(url: str, streams: list[random.Random], make, duration: float, warmup: float) -> dict:
    """Every client sends back to back until `duration`; steady-state statistics (see the docstring)."""
    records = []  # (sent, answered, tokens)

    async def client(rng, http, t0):
        while time.perf_counter() - t0 < duration:
            prompt, n = make(rng)
            sent = time.perf_counter() - t0
            tokens = await complete(http, url, prompt, n)
            records.append((sent, time.perf_counter() - t0, tokens))

    limits = httpx.Limits(max_connections=len(streams) + 8)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(rng, http, t0) for rng in streams))
    steady = [(s, a, k) for s, a, k in records if s >= warmup and a <= duration]
    if len(steady) < 10:
        print(f"warning: only {len(steady)} steady-state requests (raise --duration); using all", flush=True)
        steady = records
    window_tokens = sum(k for _, a, k in records if warmup <= a <= duration)
    return {**stats([a - s for s, a, _ in steady], [k for *_, k in steady]),
            "tokens_per_s": window_tokens / (duration - warmup),
            "requests_per_s": sum(warmup <= a <= duration for _, a, _ in records) / (duration - warmup),
            "all_requests": stats([a - s for s, a, _ in records], [k for *_, k in records]),
            "records": records}  # fmt: skip


def loadgen_server(url: str, workload: list[tuple[list[int], int]], qps: float, target: float, queries: int,
                   log_dir: Path) -> dict:  # fmt: skip
    """One LoadGen Server run; every issued query goes to the server at once (concurrently)."""
    import mlperf_loadgen as lg

    from ds_bench.scenarios import ScenarioSettings, loadgen_settings, parse_loadgen_logs

    # gen_tokens=1: LoadGen judges whole-query latency (no TTFT / TPOT constraints).
    settings = ScenarioSettings(scenario="server", gen_tokens=1, target_qps=qps, target_latency=target,
                                latency_percentile=0.99, min_query_count=queries, min_duration=1.0,
                                max_duration=3600.0)  # fmt: skip
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    http = httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=4096))
    latencies, counts = [], []

    async def one(sample) -> None:
        prompt, n = workload[sample.index]
        t = time.perf_counter()
        k = await complete(http, url, prompt, n)
        latencies.append(time.perf_counter() - t)
        counts.append(k)
        lg.QuerySamplesComplete([lg.QuerySampleResponse(sample.id, 0, 0, k)])

    def issue(samples) -> None:
        for s in samples:
            asyncio.run_coroutine_threadsafe(one(s), loop)

    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(len(workload), len(workload), lambda idx: None, lambda idx: None)
    log = lg.LogSettings()
    log.log_output.outdir = str(log_dir)
    log.log_output.copy_summary_to_stdout = False
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        lg.StartTestWithLogSettings(sut, qsl, loadgen_settings(lg, settings), log)
    finally:
        wall = time.perf_counter() - t0
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
        asyncio.run_coroutine_threadsafe(http.aclose(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    parsed = parse_loadgen_logs(log_dir)
    d = parsed["detail"]
    return {"target_qps": qps, "loadgen_result": parsed["result"],
            "loadgen_p99_s": d.get("result_99.00_percentile_latency_ns", 0) / 1e9,
            "loadgen_completed_qps": d.get("result_completed_samples_per_sec"),
            "tokens_per_s": sum(counts) / wall, **stats(latencies, counts)}  # fmt: skip


def serve(model_dir: Path, batching: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ds_serve", "serve", "--model", str(model_dir), "--model-name", "bench",
           "--port", str(port), "--max-batch", str(args.max_batch), "--batching", batching,
           "--max-queue", "100000", "--batch-wait", str(args.batch_wait), "--device", args.device]  # fmt: skip
    for flag, value in (("--threads", args.threads), ("--max-len", args.max_len), ("--dtype", args.dtype)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        if proc.poll() is not None:
            raise SystemExit(f"ds-serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="ds-small", help="registry name, built with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32)")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--duration", type=float, default=150.0, help="closed loop: seconds clients keep sending")
    p.add_argument("--warmup", type=float, default=50.0, help="closed loop: seconds left out at the start")
    p.add_argument("--max-batch", type=int, default=16, help="KV-cache rows, the same for both modes")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--batch-wait", type=float, default=0.05, help="fixed batching: wait for a full batch")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 64))
    p.add_argument("--output-len", type=int, nargs=2, default=(4, 96))
    p.add_argument("--no-loadgen", action="store_true", help="closed loop only")
    p.add_argument("--qps-fractions", type=float, nargs="+", default=(0.3, 0.5, 0.7, 0.85, 1.0),
                   help="LoadGen Server QPS, as fractions of the continuous closed-loop request rate")  # fmt: skip
    p.add_argument("--queries", type=int, default=120, help="LoadGen min_query_count per run")
    p.add_argument("--p99-target", type=float, default=None,
                   help="seconds (default: 2 x fixed batching's p99 at the lowest QPS)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    def make(rng: random.Random) -> tuple[list[int], int]:
        prompt = [rng.randrange(256) for _ in range(rng.randint(*args.prompt_len))]
        return prompt, rng.randint(*args.output_len)

    library = [make(random.Random(10_000 + i)) for i in range(256)]  # LoadGen's sample library
    results: dict = {"closed_loop": {}, "loadgen": {"continuous": [], "fixed": []}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.model, args.device, args.dtype)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        for batching in ("continuous", "fixed"):
            proc, url = serve(model_dir, batching, args)
            try:
                asyncio.run(closed_loop(url, [random.Random(i) for i in range(4)], make, 2.0, 0.0))  # warm-up
                streams = [random.Random(i) for i in range(args.clients)]  # the same requests for both modes
                results["closed_loop"][batching] = asyncio.run(
                    closed_loop(url, streams, make, args.duration, args.warmup)
                )
                print(
                    batching,
                    {k: v for k, v in results["closed_loop"][batching].items() if k != "records"},
                    flush=True,
                )
                if not args.no_loadgen:
                    rate = results["closed_loop"]["continuous"]["requests_per_s"]
                    for f in args.qps_fractions:
                        r = loadgen_server(url, library, f * rate, args.p99_target or 3600.0, args.queries,
                                           Path(tmp) / f"loadgen-{batching}-{f}")  # fmt: skip
                        results["loadgen"][batching].append(r)
                        print(batching, json.dumps(r), flush=True)
            finally:
                proc.terminate()
                proc.wait()
    cont, fixed = results["closed_loop"]["continuous"], results["closed_loop"]["fixed"]
    summary = {
        "model": args.model, "device": args.device, "dtype": args.dtype or "fp32", "clients": args.clients,
        "max_batch": args.max_batch, "duration_s": args.duration, "warmup_s": args.warmup,
        "prompt_len": args.prompt_len, "output_len": args.output_len,
        "torch_threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "std_reduction": 1 - cont["latency_std_s"] / fixed["latency_std_s"],
        "std_reduction_all_requests": 1 - cont["all_requests"]["latency_std_s"] / fixed["all_requests"]["latency_std_s"],
        "norm_latency_std_reduction": 1 - cont["norm_latency_std_s"] / fixed["norm_latency_std_s"],
        "tokens_per_s_ratio": cont["tokens_per_s"] / fixed["tokens_per_s"],
    }  # fmt: skip
    if not args.no_loadgen:
        lg_runs = results["loadgen"]
        target = args.p99_target or 2 * lg_runs["fixed"][0]["latency_p99_s"]
        best = {m: max([r["target_qps"] for r in runs if r["latency_p99_s"] <= target], default=0.0)
                for m, runs in lg_runs.items()}  # fmt: skip
        summary.update({"p99_target_s": target, "qps_at_p99_target": best,
                        "throughput_at_p99_target_ratio": best["continuous"] / best["fixed"] if best["fixed"] else None,
                        "loadgen_std_reduction": [1 - c["latency_std_s"] / f["latency_std_s"]
                                                  for c, f in zip(lg_runs["continuous"], lg_runs["fixed"])],
                        "loadgen_norm_latency_std_reduction": [
                            1 - c["norm_latency_std_s"] / f["norm_latency_std_s"]
                            for c, f in zip(lg_runs["continuous"], lg_runs["fixed"])]})  # fmt: skip
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
