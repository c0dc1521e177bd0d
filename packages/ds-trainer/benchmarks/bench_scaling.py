"""Multi-GPU scaling of ds-trainer: DDP and FSDP tokens/s per GPU at 1..N GPUs, and a checkpoint
saved on N GPUs resumed on fewer.

    # the whole plan on one machine (launches torchrun itself, one run after another):
    PYTHONPATH=packages/ds-core/src:packages/ds-models/src:packages/ds-data/src:packages/ds-trainer/src \
      python packages/ds-trainer/benchmarks/bench_scaling.py plan --gpus 1,2 --sizes 1.5b \
        --strategies ddp,fsdp --resume --out scaling.json

    # one measurement (what `plan` runs under torchrun --standalone --nproc_per_node N):
    torchrun --standalone --nproc_per_node 2 packages/ds-trainer/benchmarks/bench_scaling.py \
      step --size 1.5b --strategy fsdp --out fsdp2.json

`step` runs ds-trainer's own optimizer step (``Run.train_step``: bf16 autocast, fused AdamW,
clipping, blocks compiled regionally) on random tokens through accelerate's DDP or FSDP2, with the
micro-batch per GPU fixed, so N GPUs process N times the tokens of one (weak scaling, as
torchtitan and Megatron report it). Step time = median over the measured steps of the wall time
between two barriers, CUDA synchronised. MFU = tokens/s/GPU x (6N + 12 L d T) / peak.

`resume` trains a model whose loss falls fast (sequences of a repeated random motif) with FSDP on N
GPUs, saving a checkpoint halfway; the checkpoint is then resumed on 1 GPU (accumulation keeps the
global batch) and the losses of the second half are compared with the N-GPU run's.

On a machine without GPUs every run uses CPU processes over gloo (`--size tiny`), which is how the
script itself is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16 = 989e12  # H100 SXM / H200 dense bf16 (the same SM count and clocks)
SIZES = {
    "tiny": dict(name="ds-tiny"),
    "small": dict(name="ds-small"),
    "1.5b": dict(name="ds-1.5b", max_seq_len=2048),
    "7b": dict(name="ds-7b", max_seq_len=2048),
}
MICRO_BATCH = {"tiny": 2, "small": 8, "1.5b": 4, "7b": 1}


def model_config(size: str):
    from ds_models import ModelConfig

    spec = dict(SIZES[size])
    return ModelConfig.from_name(spec.pop("name"), **spec)


def flops_per_token(mc, seq: int) -> tuple[float, int]:
    """6N + 12 L d T (PaLM appendix B), N the parameters in matmuls (output head in, embedding out)."""
    from ds_models import Transformer

    with torch.device("meta"):
        m = Transformer(mc)
    n_total = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    n_matmul = n_total - m.embed_tokens.weight.numel() + m.lm_head.weight.numel()
    return 6 * n_matmul + 12 * mc.n_layers * mc.d_model * seq, n_total


class RandomRows(torch.utils.data.Dataset):
    """n rows of seq + 1 token ids; motif > 0 repeats a random motif of that length (learnable)."""

    def __init__(self, n: int, seq: int, vocab: int, motif: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        if motif:
            base = torch.randint(0, vocab, (n, motif), generator=g)
            self.data = base.repeat(1, (seq + 1) // motif + 1)[:, : seq + 1]
        else:
            self.data = torch.randint(0, vocab, (n, seq + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i]}


def _train_config(out: str, strategy: str, seq: int, mb: int, steps: int, accum: int = 1, **extra):
    from ds_trainer.config import TrainConfig

    cuda = torch.cuda.is_available()
    data = {
        "output_dir": out,
        "model": {"compile": cuda, "gradient_checkpointing": extra.pop("gc", False)},
        "data": {"seq_len": seq, "micro_batch_size": mb, "grad_accum_steps": accum},
        "optim": {"lr": extra.pop("lr", 3e-4), "fused": "auto"},
        "schedule": {"steps": steps, "warmup_steps": 2},
        "precision": {"dtype": "bf16" if cuda else "fp32"},
        "distributed": {"strategy": strategy},
        "logging": {"progress": False, "jsonl": True},
        **extra,
    }
    return TrainConfig.from_dict(data)


# ---- one measurement, inside torchrun ----------------------------------------------------------


def cmd_step(args) -> int:
    import torch.distributed as dist

    from ds_models import Transformer
    from ds_trainer.run import Run

    mc = model_config(args.size)
    seq = min(args.seq, mc.max_seq_len)
    mb = args.micro_batch or MICRO_BATCH[args.size]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = args.warmup + args.steps
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Transformer(mc)
    build_s = time.perf_counter() - t0
    out_dir = tempfile.mkdtemp(prefix=f"scaling-{args.size}-{args.strategy}-")
    cfg = _train_config(out_dir, args.strategy, seq, mb, total, gc=args.gc)
    run = Run(cfg, model=model, train_dataset=RandomRows(mb * world * total, seq, mc.vocab_size))
    run.setup()
    times, losses = [], []
    for i in range(total):
        batches = run._next_batches()
        run.sampler.advance()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        stats = run.train_step(batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - t)
        losses.append(float(stats["loss"]))
        if run.is_main:
            print(f"  {args.size} {args.strategy} x{world} step {i}: {times[-1] * 1e3:.0f} ms loss {losses[-1]:.3f}",
                  flush=True)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    peaks = [peak]
    if dist.is_initialized():
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
    if run.is_main:
        fpt, n_params = flops_per_token(mc, seq)
        step_s = statistics.median(times[args.warmup :])
        tokens = mb * seq * world
        result = {
            "size": args.size,
            "params": n_params,
            "strategy": args.strategy,
            "parallelism": run.parallelism,
            "gpus": world,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "micro_batch_per_gpu": mb,
            "seq_len": seq,
            "gradient_checkpointing": args.gc,
            "step_s": step_s,
            "step_s_all": times,
            "first_step_s": times[0],
            "model_build_s": build_s,
            "tokens_per_s": tokens / step_s,
            "tokens_per_s_per_gpu": tokens / step_s / world,
            "mfu": tokens / step_s / world * fpt / PEAK_BF16 if torch.cuda.is_available() else None,
            "peak_mem_gib_per_gpu": [p / 2**30 for p in peaks],
            "losses": losses,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    return 0


def cmd_train(args) -> int:
    """A short run with checkpoints (the resume experiment), inside torchrun or one process."""
    from ds_models import Transformer
    from ds_trainer.run import Run

    mc = model_config(args.size)
    seq = min(args.seq, mc.max_seq_len)
    torch.manual_seed(0)
    cfg = _train_config(
        args.output_dir, "fsdp", seq, args.micro_batch, args.steps, accum=args.accum, lr=3e-3,
        checkpoint={"every": args.every, "keep_last": 4}, stop_after_steps=args.stop_after,
    )  # fmt: skip
    rows = RandomRows(256, seq, mc.vocab_size, motif=16, seed=1)
    result = Run(cfg, model=Transformer(mc), train_dataset=rows).run()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(result.to_json(), default=str, indent=2))
    return 0


# ---- the plan: launches the runs above ---------------------------------------------------------


def _torchrun(nproc: int, argv: list[str], env: dict | None = None, timeout: float = 900) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, *argv]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, timeout=timeout).returncode


def cmd_plan(args) -> int:
    gpus_avail = torch.cuda.device_count()
    gpus = [int(g) for g in args.gpus.split(",")]
    if gpus_avail and max(gpus) > gpus_avail:
        print(
            f"bench_scaling: error: --gpus {args.gpus}: this machine has {gpus_avail} GPUs", file=sys.stderr
        )
        return 2
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if gpus_avail else "cpu (gloo)",
                     "runs": [], "resume": None}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="scaling-"))

    def save() -> None:
        Path(args.out).write_text(json.dumps(results, indent=2))

    def record(path: Path, what: dict, rc: int) -> None:
        if rc == 0 and path.is_file():
            results["runs"].append(json.loads(path.read_text()))
        else:
            results["runs"].append({**what, "error": f"exit code {rc}"})
        save()

    for size in filter(None, args.sizes.split(",")):
        for n in gpus:
            # 1-GPU runs of the strategies need one GPU each: run them side by side when GPUs allow.
            jobs = [(s, n) for s in args.strategies.split(",")]
            if n == 1 and gpus_avail >= len(jobs) > 1:
                procs = []
                for i, (s, _) in enumerate(jobs):
                    path = tmp / f"{size}-{s}-1.json"
                    argv = ["step", "--size", size, "--strategy", s, "--out", str(path), *args.step_args]
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=1", f"--master_port={29600 + i}", __file__, *argv]  # fmt: skip
                    print(f"$ CUDA_VISIBLE_DEVICES={i}", " ".join(cmd), flush=True)
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}
                    procs.append((s, path, subprocess.Popen(cmd, env=env)))
                for s, path, p in procs:
                    record(path, {"size": size, "strategy": s, "gpus": 1}, p.wait(timeout=900))
                continue
            for s, _ in jobs:
                path = tmp / f"{size}-{s}-{n}.json"
                rc = _torchrun(
                    n, ["step", "--size", size, "--strategy", s, "--out", str(path), *args.step_args]
                )
                record(path, {"size": size, "strategy": s, "gpus": n}, rc)

    # Weak-scaling efficiency: tokens/s per GPU at N GPUs over that at 1 GPU, same size and strategy.
    ok = [r for r in results["runs"] if "error" not in r]
    for r in ok:
        base = next(
            (b for b in ok if (b["size"], b["strategy"], b["gpus"]) == (r["size"], r["strategy"], 1)), None
        )
        if base:
            r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    save()

    if args.resume:
        n = max(gpus)
        run_dir = tmp / "resume-n"
        common = ["--size", args.resume_size, "--steps", "16", "--every", "8"]
        mb = 4
        rc = _torchrun(n, ["train", *common, "--micro-batch", str(mb), "--output-dir", str(run_dir),
                           "--out", str(tmp / "resume-n.json")])  # fmt: skip
        entry: dict = {"size": args.resume_size, "saved_on": n, "resumed_on": 1, "rc_first": rc}
        if rc == 0:
            one_dir = tmp / "resume-1"
            shutil.copytree(run_dir, one_dir)
            # Keep the halfway checkpoint only: the 1-GPU run must redo steps 9..16 itself.
            for ckpt in (one_dir / "checkpoints").iterdir():
                if ckpt.name != "step_00000008":
                    shutil.rmtree(ckpt)
            shutil.rmtree(one_dir / "model", ignore_errors=True)
            rc2 = _torchrun(1, ["train", *common, "--micro-batch", str(mb), "--accum", str(n),
                                "--output-dir", str(one_dir), "--out", str(tmp / "resume-1.json")],
                            env={"CUDA_VISIBLE_DEVICES": "0"} if gpus_avail else None)  # fmt: skip
            entry["rc_second"] = rc2
            # Losses from each run's own result (the copied metrics.jsonl also holds the first run's).
            first = _result_losses(tmp / "resume-n.json")
            second = _result_losses(tmp / "resume-1.json") if rc2 == 0 else {}
            entry["losses_saved_run"] = first
            entry["losses_resumed_run"] = second
            later = sorted(s for s in second if s > 8 and s in first)
            entry["resumed_steps"] = later
            if later:
                entry["max_rel_diff_after_resume"] = max(
                    abs(second[s] - first[s]) / abs(first[s]) for s in later
                )
                entry["loss_at_step_1"] = first.get(1)
                entry["loss_at_step_8"] = first.get(8)
        results["resume"] = entry
        save()
    print(json.dumps(results, indent=2))
    return 0


def _result_losses(path: Path) -> dict[int, float]:
    """step -> loss of the steps a `train` run itself made (its TrainResult)."""
    if not path.is_file():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).get("losses", {}).items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="one measurement (run it under torchrun)")
    s.add_argument("--size", choices=sorted(SIZES), default="1.5b")
    s.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    s.add_argument("--seq", type=int, default=2048)
    s.add_argument("--micro-batch", type=int, default=0, help="per GPU; 0 = the size's default")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--gc", action="store_true", help="gradient checkpointing")
    s.add_argument("--out", required=True)
    t = sub.add_parser("train", help="a short FSDP run with checkpoints (the resume experiment)")
    t.add_argument("--size", choices=sorted(SIZES), default="small")
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--micro-batch", type=int, default=4)
    t.add_argument("--accum", type=int, default=1)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--every", type=int, default=4)
    t.add_argument("--stop-after", type=int, default=0)
    t.add_argument("--output-dir", required=True)
    t.add_argument("--out", required=True)
    pl = sub.add_parser("plan", help="run the scaling table (and the resume check) by launching torchrun")
    pl.add_argument("--gpus", default="1,2", help="process counts to measure")
    pl.add_argument("--sizes", default="1.5b")
    pl.add_argument("--strategies", default="ddp,fsdp")
    pl.add_argument("--resume", action="store_true", help="also save on max(--gpus) and resume on 1")
    pl.add_argument("--resume-size", default="small")
    pl.add_argument("--step-args", nargs=argparse.REMAINDER, default=[], help="passed on to every `step`")
    pl.add_argument("--out", default="scaling.json")
    args = p.parse_args()
    return {"step": cmd_step, "train": cmd_train, "plan": cmd_plan}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
