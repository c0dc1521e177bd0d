"""Continuous vs fixed batching against real ds-serve processes: TTFT, TPOT, e2e, throughput at an SLO.

Builds a registry model (ds-small by default) with random weights in a temporary directory, with a
word-level tokenizer in which every id of the model's vocabulary decodes to one word, so each
generated token is one streamed chunk. Starts two `ds-serve` processes, one per batching mode, with
the same KV-cache rows (--max-batch): the baseline gets the same memory and the same step code, and
only the scheduling differs. Every request is streamed (OpenAI /v1/completions, stream=true, SSE),
has a random prompt (--prompt-len) and a random, exact output length (--output-len, ignore_eos);
both modes get the same seeded requests. Per request: TTFT, TPOT, e2e latency and normalized
latency, as vLLM's serving benchmark defines them (see serving_stats.py).

1. Unloaded: --unloaded requests one at a time per mode; TTFT0 / TPOT0 = the medians, taking the
   lower of the two modes (the model on this hardware, not a scheduler).
2. Closed loop, --clients concurrent clients (100): each sends its next request when the last is
   answered, for --duration s; statistics over the steady state (sent after --warmup, answered
   before the end). Its request rate is each mode's capacity.
3. Open loop, Poisson arrivals (fixed seed, the same schedule and requests for both modes) at rates
   --rates x the continuous capacity, the two modes alternating at each rate. Every point has the
   same number of queries, sized from --budget-s (at least 100, so a p99 rests on >= 2 queries
   above it). A mode stops once it fails every SLO at a rate at or above its capacity.
4. Throughput at an SLO: for each SLO (p99 bounds scaled from TTFT0 / TPOT0, see --slo-*), the
   highest swept rate each mode sustains, and the ratio.

    python packages/ds-serve/benchmarks/bench_batching.py --budget-s 1500 --out result.json
    python packages/ds-serve/benchmarks/bench_batching.py --model ds-1.5b --device cuda --dtype bf16 \\
        --max-batch 64 --max-len 512 --budget-s 300 --rates 0.3 0.5 0.7 0.85 1.0 1.15 --out result.json
    python packages/ds-serve/benchmarks/bench_batching.py --report result.json   # markdown tables

A follow-up sweep reusing an earlier run's capacities and SLOs (e.g. lower rates for one mode):
--capacity C F --slo-base TTFT0 TPOT0 --modes fixed --rates 0.1 0.15.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_stats import (
    Slo,
    max_rate_meeting,
    queries_per_point,
    request_metrics,
    scaled_slo,
    std_reduction,
    summarize_requests,
)

MODES = ("continuous", "fixed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(path: Path, name: str, device: str, dtype: str | None) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ds_models import ModelConfig, Transformer

    config = ModelConfig.from_name(name)
    # One word per id, the EOS word an ordinary token (ignore_eos anyway): decoding never merges or
    # drops tokens, so every step of every request streams one chunk and TTFT / ITL are per token.
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    with torch.device(device):  # a 1.5B model initialises in seconds on the GPU, minutes on the CPU
        model = Transformer(config)
    if dtype:
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    model.to("cpu").save_pretrained(path, tokenizer=tok)


async def stream(http: httpx.AsyncClient, url: str, prompt: list[int], n: int) -> dict:
    """One streamed completion; returns request_metrics plus the send time (perf_counter)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    choice_times, text_times, words, finish = [], [], 0, None
    sent = time.perf_counter()
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            t = time.perf_counter()
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"stream error: {line[:200]}")
            if not data.get("choices"):  # e.g. a usage-only chunk
                continue
            choice = data["choices"][0]
            choice_times.append(t)
            if choice.get("text"):
                text_times.append(t)
                words += len(choice["text"].split())
            finish = choice.get("finish_reason") or finish
    if finish != "length" or words != n:
        raise RuntimeError(f"expected {n} tokens ending in 'length', got {words} words, finish {finish!r}")
    return {"sent": sent, **request_metrics(sent, choice_times, text_times, n)}


async def attempt(http: httpx.AsyncClient, url: str, prompt: list[int], n: int) -> dict:
    """stream(), with a failure recorded ({"error": ...}) instead of ending the run: failed requests
    are counted per point and count against its SLOs (as requests over every bound)."""
    sent = time.perf_counter()
    try:
        return await stream(http, url, prompt, n)
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return {"sent": sent, "error": f"{type(e).__name__}: {e}"[:300]}


def split(records: list[dict]) -> tuple[list[dict], int]:
    ok = [r for r in records if "error" not in r]
    return ok, len(records) - len(ok)


def new_client(connections: int) -> httpx.AsyncClient:
    # idle connections expire on the client first (the server keeps them server.keep_alive_s):
    # the H100 run's two ReadErrors most likely came from uvicorn's old 5 s, equal to httpx's expiry
    limits = httpx.Limits(max_connections=connections, keepalive_expiry=2.0)
    return httpx.AsyncClient(timeout=3600, limits=limits)


async def one_at_a_time(url: str, workload: list[tuple[list[int], int]]) -> list[dict]:
    async with new_client(4) as http:
        return [await stream(http, url, p, n) for p, n in workload]


async def closed_loop(url: str, clients: int, make, duration: float, warmup: float, seed: int) -> dict:
    """Every client sends back to back until `duration`; steady-state statistics."""
    records = []

    async def client(rng, http, t0):
        while time.perf_counter() - t0 < duration:
            prompt, n = make(rng)
            rec = await attempt(http, url, prompt, n)
            rec["sent"] -= t0
            rec["done"] = time.perf_counter() - t0
            records.append(rec)

    async with new_client(clients + 8) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(random.Random(seed + i), http, t0) for i in range(clients)))
    records, failed = split(records)
    steady = [r for r in records if r["sent"] >= warmup and r["done"] <= duration]
    answered = [r for r in records if warmup <= r["done"] <= duration]
    window = duration - warmup
    return {
        **summarize_requests(steady),
        "failed": failed,
        "requests_per_s": len(answered) / window,
        "tokens_per_s": sum(r["output_tokens"] for r in answered) / window,
        "all_requests": summarize_requests(records),
        "records": steady,
    }


async def open_loop(url: str, workload: list[tuple[list[int], int]], rate: float, seed: int) -> dict:
    """Poisson arrivals at `rate`/s from a fixed seed, one request per arrival.

    A Poisson process conditioned on n arrivals in [0, n / rate] (n sorted uniform times): the
    offered rate is exactly `rate`, where n free exponential gaps would miss it by ~1/sqrt(n)
    (seed 0, n = 275: by 13 %), the same way at every point."""
    n = len(workload)
    arrivals = np.sort(np.random.default_rng(seed).uniform(0, n / rate, n))
    async with new_client(len(workload) + 8) as http:
        t0 = time.perf_counter()
        tasks = []
        for (prompt, n), at in zip(workload, arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(attempt(http, url, prompt, n)))
        records, failed = split(await asyncio.gather(*tasks))
        span = time.perf_counter() - t0
    return {
        "rate": rate,
        **summarize_requests(records),
        "failed": failed,
        "completed_per_s": len(records) / span,
        "tokens_per_s": sum(r["output_tokens"] for r in records) / span,
        "span_s": span,
        "records": [{k: v for k, v in r.items() if k != "sent"} for r in records],
    }


def serve(model_dir: Path, batching: str, args, log: Path) -> tuple[subprocess.Popen, str]:
    """Start one server (returns at once; `wait_healthy` waits for it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ds_serve", "serve", "--model", str(model_dir), "--model-name", "bench",
           "--port", str(port), "--max-batch", str(args.max_batch), "--batching", batching,
           "--max-queue", "100000", "--batch-wait", str(args.batch_wait), "--device", args.device]  # fmt: skip
    for flag, value in (("--threads", args.threads), ("--max-len", args.max_len), ("--dtype", args.dtype)):
        if value:
            cmd += [flag, str(value)]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout  # start-up: model load (+ CUDA graph capture on a GPU)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ds-serve exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(
        f"ds-serve did not answer /health within {timeout:.0f} s; log:\n{log.read_text()[-3000:]}"
    )


def fmt(summary: dict | None, key: str = "p99", scale: float = 1.0) -> str:
    return "-" if not summary else f"{summary[key] * scale:.3g}"


def summarize_run(results: dict) -> dict:
    """Capacities, std reductions and the rate each mode sustains under each SLO (from what was measured)."""
    cl, ol = results["closed_loop"], results["open_loop"]
    at_slo = {}
    for d in results["slo"]["slos"]:
        slo = Slo(**d)
        best = {m: max_rate_meeting([(r["rate"], r) for r in ol.get(m, [])], slo) for m in MODES}
        (c, _), (f, f_fail) = best["continuous"], best["fixed"]
        # Fixed batching failing at the lowest swept rate sustains less than that rate: a lower bound.
        at_slo[slo.name] = {"continuous": best["continuous"], "fixed": best["fixed"], "ratio": c / f if f else None,
                            "ratio_at_least": c / f_fail if not f and f_fail else None}  # fmt: skip
    matched = []
    for c in ol.get("continuous", []):
        f = next((f for f in ol.get("fixed", []) if abs(f["rate"] - c["rate"]) < 1e-9), None)
        if f is not None:
            matched.append({"rate": c["rate"], "std_reduction": std_reduction(c, f)})
    out = {"capacity_requests_per_s": results["info"].get("capacity_requests_per_s"),
           "open_loop_std_reduction": matched, "rate_at_slo": at_slo}  # fmt: skip
    if len(cl) == 2:
        out["closed_loop_tokens_per_s_ratio"] = cl["continuous"]["tokens_per_s"] / cl["fixed"]["tokens_per_s"]
        out["closed_loop_std_reduction"] = std_reduction(cl["continuous"], cl["fixed"])
    return out


def report(results: dict) -> str:
    """Markdown tables of a result JSON (what docs/benchmarks/ds-serve.md shows)."""

    def cells(s: dict, metric: str, keys=("mean", "std", "p50", "p90", "p99"), scale=1.0) -> str:
        return " / ".join(fmt(s.get(metric), k, scale) for k in keys)

    slo = results["slo"]
    lines = [f"TTFT0 {slo['ttft0_s'] * 1e3:.1f} ms, TPOT0 {slo['tpot0_s'] * 1e3:.1f} ms; SLOs (p99 bounds, s): "
             + "; ".join(f"{x['name']}: " + ", ".join(f"{k} {x[k]:.3g}" for k in ("ttft", "tpot", "e2e") if x[k])
                         for x in slo["slos"]), ""]  # fmt: skip
    head = "| mode | n | TTFT s | TPOT ms | e2e s | normalized ms/token | decode TPOT ms (p50 / p99) |"
    for title, rows in (
        ("Unloaded", results["unloaded"]),
        ("Closed loop, steady state", results["closed_loop"]),
    ):
        lines += [f"{title} (mean / std / p50 / p90 / p99):", "", head, "|---|---|---|---|---|---|---|"]
        for m, r in rows.items():
            lines.append(f"| {m} | {r['n']} | {cells(r, 'ttft')} | {cells(r, 'tpot', scale=1e3)} | {cells(r, 'e2e')} "
                         f"| {cells(r, 'norm_latency', scale=1e3)} | {cells(r, 'decode_tpot', ('p50', 'p99'), 1e3)} |")  # fmt: skip
        lines.append("")
    cl = results["closed_loop"]
    if cl:
        lines.append("Closed loop: " + ", ".join(f"{m} {r['requests_per_s']:.2f} req/s {r['tokens_per_s']:.0f} tok/s"
                                                 for m, r in cl.items()))  # fmt: skip
    if len(cl) == 2:
        red = std_reduction(cl["continuous"], cl["fixed"])
        lines += ["std reduction (1 - continuous/fixed): " + ", ".join(f"{k} {v:.0%}" for k, v in red.items() if v is not None), ""]  # fmt: skip
    lines += ["Open loop (Poisson), each cell continuous / fixed; p99 unless marked; std reduction = 1 - cont/fixed:", "",
              "| rate /s | done /s | tok/s | TTFT s | TPOT ms | e2e s | std red. TTFT / TPOT / e2e / norm | SLO tight / loose / e2e |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ol = results["open_loop"]
    for rate in sorted({r["rate"] for runs in ol.values() for r in runs}):
        pair = [next((r for r in ol.get(m, []) if abs(r["rate"] - rate) < 1e-9), None) for m in MODES]

        def cell(get, pair=pair):
            return " / ".join("-" if x is None else get(x) for x in pair)

        c, f = pair
        red = std_reduction(c, f) if c and f else {}
        reds = " / ".join(
            "-" if red.get(k) is None else f"{red[k]:.0%}" for k in ("ttft", "tpot", "e2e", "norm_latency")
        )
        met = " / ".join("".join("-" if x is None else "yn"[not x["slo_met"][s["name"]]] for x in pair)
                         for s in slo["slos"])  # fmt: skip
        lines.append(f"| {rate:.2f} | {cell(lambda x: format(x['completed_per_s'], '.2f'))} "
                     f"| {cell(lambda x: format(x['tokens_per_s'], '.0f'))} | {cell(lambda x: fmt(x['ttft']))} "
                     f"| {cell(lambda x: fmt(x['tpot'], scale=1e3))} | {cell(lambda x: fmt(x['e2e']))} | {reds} | {met} |")  # fmt: skip
    lines.append("")
    for name, r in summarize_run(results)["rate_at_slo"].items():
        lines.append(f"SLO {name}: continuous {r['continuous'][0]:.2f} /s (first fail {r['continuous'][1]}), "
                     f"fixed {r['fixed'][0]:.2f} /s (first fail {r['fixed'][1]}), ratio {r['ratio']}, "
                     f"at least {r['ratio_at_least']}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="ds-small", help="registry name, built with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (None: fp32)")
    p.add_argument("--threads", type=int, default=None, help="server torch threads")
    p.add_argument("--max-batch", type=int, default=16, help="KV-cache rows, the same for both modes")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--batch-wait", type=float, default=0.05, help="fixed batching: wait for a full batch")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 64))
    p.add_argument("--output-len", type=int, nargs=2, default=(4, 96))
    p.add_argument("--budget-s", type=float, default=2100.0,
                   help="seconds for the measurements (model build and start-up not counted); sizes the "
                        "closed loop and the queries per open-loop point, and stops the sweep at 1.15x")  # fmt: skip
    p.add_argument("--unloaded", type=int, default=8, help="unloaded requests per mode")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument(
        "--duration", type=float, default=None, help="closed loop seconds (None: 6%% of --budget-s, >= 20)"
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="closed loop seconds left out (None: --duration / 3)"
    )
    p.add_argument("--rates", type=float, nargs="+", default=(0.25, 0.45, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2),
                   help="open-loop arrival rates, as fractions of continuous batching's closed-loop rate")  # fmt: skip
    p.add_argument(
        "--queries", type=int, default=None, help="queries per open-loop point (None: sized from --budget-s)"
    )
    p.add_argument("--slo-tight", type=float, nargs=2, default=(5.0, 3.0), metavar=("TTFT_X", "TPOT_X"),
                   help="SLO 'tight': p99 TTFT <= TTFT_X * TTFT0 and p99 TPOT <= TPOT_X * TPOT0")  # fmt: skip
    p.add_argument("--slo-loose", type=float, nargs=2, default=(20.0, 10.0), metavar=("TTFT_X", "TPOT_X"),
                   help="SLO 'loose', the same form")  # fmt: skip
    p.add_argument("--slo-e2e", type=float, default=3.0, metavar="E2E_X",
                   help="SLO 'e2e' (whole-query, MLPerf GPT-J style): p99 e2e <= E2E_X * unloaded e2e of "
                        "the longest output, TTFT0 + (max output - 1) * TPOT0")  # fmt: skip
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="batching modes to run")
    p.add_argument("--capacity", type=float, nargs=2, default=None, metavar=("CONTINUOUS", "FIXED"),
                   help="req/s of an earlier closed loop: skip the closed loop (a follow-up sweep)")  # fmt: skip
    p.add_argument("--slo-base", type=float, nargs=2, default=None, metavar=("TTFT0", "TPOT0"),
                   help="seconds, from an earlier run: its SLOs instead of this run's unloaded medians")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--report", default=None, metavar="JSON", help="print a result file's tables and exit")
    args = p.parse_args()
    # `timeout` / kill: run the finally blocks, so the two servers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return

    def make(rng: random.Random) -> tuple[list[int], int]:
        prompt = [rng.randrange(256) for _ in range(rng.randint(*args.prompt_len))]
        return prompt, rng.randint(*args.output_len)

    t_start = time.perf_counter()
    duration = args.duration or max(20.0, 0.06 * args.budget_s)
    warmup = args.warmup if args.warmup is not None else duration / 3
    info = {
        "model": args.model, "device": args.device, "dtype": args.dtype or "fp32", "max_batch": args.max_batch,
        "max_len": args.max_len, "batch_wait_s": args.batch_wait, "prompt_len": args.prompt_len,
        "output_len": args.output_len, "clients": args.clients, "duration_s": duration, "warmup_s": warmup,
        "budget_s": args.budget_s, "seed": args.seed, "torch": torch.__version__,
        "torch_threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": [os.getloadavg()],
        "command": " ".join(sys.argv),
    }  # fmt: skip
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    import ds_models.model
    import ds_serve.engine
    import ds_serve.scheduler

    # The engine under test, by content: results are comparable only between identical sources.
    for mod in (ds_serve.scheduler, ds_serve.engine, ds_models.model):
        info[f"sha256_{mod.__name__}"] = hashlib.sha256(Path(mod.__file__).read_bytes()).hexdigest()[:16]
    modes = [m for m in MODES if m in args.modes]
    results: dict = {"info": info, "unloaded": {}, "closed_loop": {}, "open_loop": {m: [] for m in modes}}

    def checkpoint() -> None:  # atomically, after every phase: a cut-short run keeps what it measured
        info["load_average"].append(os.getloadavg())
        if args.out:
            out = Path(args.out)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            os.replace(tmp, out)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.model, args.device, args.dtype)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        procs, urls = {}, {}
        try:
            logs = {mode: Path(tmp) / f"{mode}.log" for mode in modes}
            for mode in modes:  # both start together: their start-ups overlap
                procs[mode], urls[mode] = serve(model_dir, mode, args, logs[mode])
            for mode in modes:
                wait_healthy(procs[mode], urls[mode], logs[mode])
            for mode in modes:  # warm-up: a full batch, every output length up to the longest
                warm = [make(random.Random(-1 - i)) for i in range(args.max_batch)]
                warm = [(prompt, args.output_len[1] if i == 0 else n) for i, (prompt, n) in enumerate(warm)]

                async def warm_up(url=urls[mode], warm=warm):
                    async with new_client(len(warm) + 8) as http:
                        await asyncio.gather(*(stream(http, url, prompt, n) for prompt, n in warm))

                asyncio.run(warm_up())
            t_measure = time.perf_counter()
            print(f"servers up and warm after {t_measure - t_start:.0f} s", flush=True)

            # 1. unloaded
            solo = [make(random.Random(1_000_000 + args.seed + i)) for i in range(args.unloaded)]
            for mode in modes:
                recs = asyncio.run(one_at_a_time(urls[mode], solo))
                results["unloaded"][mode] = {**summarize_requests(recs), "records": recs}
            ttft0 = min(
                statistics.median(r["ttft"] for r in results["unloaded"][m]["records"]) for m in modes
            )
            tpot0 = min(
                statistics.median(r["tpot"] for r in results["unloaded"][m]["records"]) for m in modes
            )
            if args.slo_base:
                ttft0, tpot0 = args.slo_base
            e2e0 = ttft0 + (args.output_len[1] - 1) * tpot0
            slos = [
                scaled_slo("tight", ttft0, tpot0, ttft_x=args.slo_tight[0], tpot_x=args.slo_tight[1]),
                scaled_slo("loose", ttft0, tpot0, ttft_x=args.slo_loose[0], tpot_x=args.slo_loose[1]),
                scaled_slo("e2e", ttft0, tpot0, e2e0=e2e0, e2e_x=args.slo_e2e),
            ]
            results["slo"] = {"ttft0_s": ttft0, "tpot0_s": tpot0, "e2e0_longest_s": e2e0,
                              "slos": [s.to_dict() for s in slos]}  # fmt: skip
            print(f"unloaded TTFT0 {ttft0 * 1e3:.1f} ms, TPOT0 {tpot0 * 1e3:.1f} ms; SLOs {slos}", flush=True)
            checkpoint()

            # 2. closed loop
            for mode in modes if not args.capacity else ():
                r = asyncio.run(closed_loop(urls[mode], args.clients, make, duration, warmup, args.seed))
                results["closed_loop"][mode] = r
                print(f"closed loop {mode}: n {r['n']}, {r['requests_per_s']:.2f} req/s, "
                      f"{r['tokens_per_s']:.0f} tok/s, e2e std {fmt(r['e2e'], 'std')} s, "
                      f"TTFT p99 {fmt(r['ttft'])} s", flush=True)  # fmt: skip
                checkpoint()
            cl = results["closed_loop"]

            # 3. open loop
            capacity = (
                dict(zip(MODES, args.capacity))
                if args.capacity
                else {m: cl[m]["requests_per_s"] for m in modes}
            )
            info["capacity_requests_per_s"] = capacity
            rates = [f * capacity["continuous"] for f in args.rates]
            left = args.budget_s - (time.perf_counter() - t_measure)
            n = args.queries or queries_per_point(left, rates, list(capacity.values()))
            workload = [make(random.Random(2_000_000 + args.seed + i)) for i in range(n)]
            info["queries_per_point"] = n
            print(f"open loop: {n} queries per point, rates {[round(r, 2) for r in rates]}, "
                  f"{left:.0f} s left", flush=True)  # fmt: skip
            active = set(modes)
            deadline = t_measure + 1.15 * args.budget_s
            for rate in rates:
                for mode in modes:
                    if mode not in active:
                        continue
                    if time.perf_counter() > deadline:
                        print(f"budget spent: skipping {mode} at {rate:.2f}/s", flush=True)
                        continue
                    r = asyncio.run(open_loop(urls[mode], workload, rate, args.seed))
                    # A failed request is over every bound: more than 1 % of them fails a p99 SLO.
                    ok = r["failed"] <= 0.01 * (r["n"] + r["failed"])
                    r["slo_met"] = {s.name: ok and s.met(r) for s in slos}
                    results["open_loop"][mode].append(r)
                    print(f"open {mode} {rate:.2f}/s: done {r['completed_per_s']:.2f}/s, p99 TTFT {fmt(r['ttft'])}"
                          f" TPOT {fmt(r['tpot'])} e2e {fmt(r['e2e'])} s, SLO {r['slo_met']}, failed {r['failed']}", flush=True)  # fmt: skip
                    if rate >= capacity[mode] and not any(r["slo_met"].values()):
                        active.discard(mode)  # past its capacity and failing: higher rates only fail longer
                    checkpoint()
        except BaseException:
            for mode in procs:  # the servers' side of a failure
                print(f"--- {mode} server log (tail) ---\n{logs[mode].read_text()[-2000:]}", file=sys.stderr)
            raise
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait()

    results["summary"] = {**summarize_run(results), "wall_s": time.perf_counter() - t_start}
    checkpoint()
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
