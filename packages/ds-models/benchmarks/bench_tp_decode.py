"""Tensor-parallel decode of random-weight ds models (issue 12): ds-67b split across GPUs.

    PYTHONPATH=packages/ds-core/src:packages/ds-models/src torchrun --standalone --nproc_per_node 2 \\
        packages/ds-models/benchmarks/bench_tp_decode.py --model ds-67b --dtype bf16 --out tp.json

    # CPU smoke test of this script (what the test suite runs):
    torchrun --standalone --nproc_per_node 2 packages/ds-models/benchmarks/bench_tp_decode.py \\
        --model ds-tiny --device cpu --backend gloo --dtype fp32 --out tp.json

Each rank builds only its shards (ds_models.parallel.build_parallel: meta device, DTensor plan,
to_empty, registry init on the device), prefills a --prompt-len random prompt (the same on every
rank) and decodes --new-tokens greedily, first --eager-steps steps eagerly, then (CUDA) the whole run
again with the step captured in a CUDA graph, NCCL all-reduces included.

Reported (JSON on rank 0, rewritten after every phase so a later failure keeps what was measured):
  build_s             meta build + shard + allocate + init, per phase
  memory              per rank: weights held (bytes), allocated after build, peak, device used
  decode              per mode: median step time over the steady steps (all but the first 2),
                      tok/s = batch / median step
  floor               the weight-bandwidth bound of a step: weight bytes per GPU / --peak-bw
                      (auto: 4.8 TB/s H200, 3.35 TB/s H100), and the achieved GB/s
  checks              every rank decoded the same tokens; graph tokens == eager tokens
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ds_models import REGISTRY, ModelConfig, Transformer, sample
from ds_models.parallel import ParallelDecoder, build_parallel, local_weight_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12}
WARM_STEPS = 2  # not counted in the median (allocator, NCCL and cuBLAS first-use costs)
CHECK_FULL_MAX_BYTES = 20e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ds-67b", choices=list(REGISTRY), help="registry name")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--eager-steps", type=int, default=8, help="eager decode steps (all of them on CPU)")
    p.add_argument("--mode", default="auto", choices=["auto", "eager", "cuda-graph"],
                   help="auto: eager steps, then the cuda-graph run on CUDA")  # fmt: skip
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--backend", default=None, help="process-group backend (default nccl on cuda, gloo on cpu)"
    )
    p.add_argument("--peak-bw", type=float, default=0.0, help="bytes/s for the floor; 0 = from the GPU name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-full", default="auto", choices=["auto", "yes", "no"],
                   help="compare the prompt's logits with the unsharded model (gathered on every rank); "
                   f"auto: yes below {CHECK_FULL_MAX_BYTES / 1e9:.0f} GB of weights")  # fmt: skip
    p.add_argument("--out", default=None, help="JSON written by rank 0")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer")
    if args.new_tokens < WARM_STEPS + 2:
        p.error(f"--new-tokens: expected at least {WARM_STEPS + 2} (steady steps are timed)")
    return args


def log(rank, *msg):
    if rank == 0:
        print(f"[{time.strftime('%H:%M:%S')}]", *msg, flush=True)


def write_json(path, result):
    if path is None:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode(decoder, prompt, n_steps, device):
    """Prefill, then n_steps greedy one-token steps, each timed. -> (tokens (B, 1 + n_steps), step seconds)."""
    T = prompt.shape[1]
    logits = decoder.prefill(prompt)
    tok = sample(logits)
    tokens, times = [tok], []
    input_pos = torch.tensor([T], dtype=torch.long, device=device)
    for _ in range(n_steps):
        sync(device)
        t0 = time.perf_counter()
        logits = decoder.step(tok[:, None], input_pos)
        tok = sample(logits)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(tok)
        input_pos += 1
    return torch.stack(tokens, dim=1).tolist(), times


def summarize(times, batch) -> dict[str, float]:
    steady = times[WARM_STEPS:] or times
    med = statistics.median(steady)
    return {
        "steps": len(times),
        "first_step_ms": times[0] * 1e3,  # cuda-graph: includes the warm-up runs and the capture
        "median_step_ms": med * 1e3,
        "min_step_ms": min(steady) * 1e3,
        "max_step_ms": max(steady) * 1e3,
        "tok_per_s": batch / med,
    }


def full_model_check(model, prompt, device) -> dict[str, float]:
    """The last position's logits of the sharded model next to the same weights unsharded."""
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.to(model.norm.weight.dtype).to_empty(device=device)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight  # to_empty gave each its own tensor
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    plain.load_state_dict(state)
    del state
    with torch.no_grad():
        ref = plain.eval()(prompt)[:, -1]  # (B, vocab) fp32
        got = model(prompt)[:, -1]
    del plain
    diff = (got - ref).abs().max().item()
    return {
        "max_abs_diff": diff,
        "rel_diff": diff / ref.abs().max().item(),
        "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group(backend, device_id=device, timeout=datetime.timedelta(minutes=5))
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    mesh = init_device_mesh(args.device, (world,))
    config = ModelConfig.from_name(args.model)
    dtype = DTYPES[args.dtype]
    result = {
        "model": args.model, "dtype": args.dtype, "tp": world, "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "backend": backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "plan": "q/k/v, gate/up colwise; o/down rowwise; lm_head vocab-parallel unless tied; embeddings, norms replicated",
    }  # fmt: skip
    log(rank, f"{args.model} {args.dtype} tp={world} on {result['device']}")

    sync(device)
    t0 = time.perf_counter()
    model = build_parallel(config, mesh, dtype=dtype, seed=args.seed)
    sync(device)
    dist.barrier()
    result["build_s"] = time.perf_counter() - t0
    weight_bytes = local_weight_bytes(model)
    mem = {"weight_bytes": weight_bytes}
    if device.type == "cuda":
        free, capacity = torch.cuda.mem_get_info(device)
        mem.update(allocated_after_build=torch.cuda.memory_allocated(device), device_used=capacity - free)
    result["memory"] = [None] * world
    dist.all_gather_object(result["memory"], mem)
    log(rank, f"built in {result['build_s']:.1f} s; weights per rank {weight_bytes / 1e9:.2f} GB")

    peak = args.peak_bw or next((bw for name, bw in PEAK_BW.items() if name in result["device"]), 0.0)
    if peak:
        result["floor"] = {"peak_bw": peak, "step_ms": weight_bytes / peak * 1e3, "tok_per_s": args.batch * peak / weight_bytes}  # fmt: skip
    write_json(args.out if rank == 0 else None, result)

    gen = torch.Generator().manual_seed(args.seed)  # the same prompt on every rank
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=gen).to(device)
    cache_len = args.prompt_len + args.new_tokens
    result["decode"], result["checks"] = {}, {}
    modes = []
    if args.mode in ("auto", "eager"):
        modes.append("eager")
    if args.mode == "cuda-graph" or (args.mode == "auto" and device.type == "cuda"):
        modes.append("cuda-graph")
    tokens = {}
    for mode in modes:
        steps = args.new_tokens - 1
        if mode == "eager" and "cuda-graph" in modes:
            steps = min(steps, max(args.eager_steps, WARM_STEPS + 2))
        try:
            decoder = ParallelDecoder(model, args.batch, cache_len, mode=mode)
            sync(device)
            t0 = time.perf_counter()
            toks, times = decode(decoder, prompt, steps, device)
            wall = time.perf_counter() - t0
            del decoder
        except Exception as e:  # keep the numbers of the other mode; the message says why
            traceback.print_exc()
            result["decode"][mode] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            write_json(args.out if rank == 0 else None, result)
            continue
        tokens[mode] = toks
        entry = summarize(times, args.batch)
        entry["wall_s"] = wall
        if peak:
            entry["weight_gb_per_s"] = weight_bytes / (entry["median_step_ms"] / 1e3) / 1e9
            entry["fraction_of_floor"] = result["floor"]["step_ms"] / entry["median_step_ms"]
        result["decode"][mode] = entry
        every = [None] * world
        dist.all_gather_object(every, toks)
        result["checks"][f"{mode}_same_tokens_on_all_ranks"] = all(t == toks for t in every)
        log(rank, f"{mode}: {entry['median_step_ms']:.2f} ms/step, {entry['tok_per_s']:.1f} tok/s")
        write_json(args.out if rank == 0 else None, result)
    if "eager" in tokens and "cuda-graph" in tokens:
        n = len(tokens["eager"][0])
        result["checks"]["graph_tokens_equal_eager"] = all(
            g[:n] == e for g, e in zip(tokens["cuda-graph"], tokens["eager"])
        )
    result["tokens_row0"] = next(iter(tokens.values()))[0][:16] if tokens else None
    if device.type == "cuda":
        peaks = [None] * world
        dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device))
        for m, p in zip(result["memory"], peaks):
            m["peak_allocated"] = p
    total_bytes = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    if args.check_full == "yes" or (args.check_full == "auto" and total_bytes < CHECK_FULL_MAX_BYTES):
        full = full_model_check(model, prompt, device)
        result["full_model"] = full
        # bf16 partial sums are rounded before the all-reduce: a broken plan is off by O(1), not 1e-2.
        result["checks"]["full_model_logits_close"] = full["rel_diff"] < (
            1e-5 if dtype == torch.float32 else 5e-2
        )
        log(rank, f"unsharded model: rel diff {full['rel_diff']:.2e}, top-1 agree {full['top1_agree']:.2f}")
    write_json(args.out if rank == 0 else None, result)
    if rank == 0:
        print(json.dumps(result, indent=2), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    ok = all("error" not in d for d in result["decode"].values()) and all(result["checks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
