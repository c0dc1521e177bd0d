"""Training throughput of ds-trainer: model FLOPs utilisation, HF Trainer baseline, fp8, and the memory
saved by gradient checkpointing -- all measured in one process, side by side.

    PYTHONPATH=packages/ds-core/src:packages/ds-models/src:packages/ds-data/src:packages/ds-trainer/src \
      python packages/ds-trainer/benchmarks/bench_mfu.py --sizes 350m,1.5b --out results.json

For each size (a ~350M ds model and the ds-1.5b registry entry, sequence length 2048, bf16):

- ds:     ds-trainer's own optimizer step (``Run.train_step``: token-normalised loss, clipping,
          fused AdamW, LambdaLR) on the model compiled block by block, SDPA (FlashAttention) attention.
- hf:     transformers.Trainer on the HF twin of the same shape (ds_models.hf_import.hf_config_dict:
          LlamaForCausalLM, Qwen2ForCausalLM for ds-1.5b) and batch: bf16 autocast,
          fused AdamW, SDPA -- its usual fast settings (no torch.compile, which it leaves off).
- hf_compile: the same with TrainingArguments(torch_compile=True).
- fp8:    the ds step with precision fp8 (accelerate + torchao float8 linears), if torchao is there.
- gc:     the ds step with gradient checkpointing: peak memory and throughput.

MFU = tokens/s x FLOPs/token / peak, FLOPs/token = 6 N + 12 L d T (PaLM appendix B: N the matmul
parameters including the output head, the second term attention scores and values, fwd + bwd),
peak = 989 TFLOP/s (H100 SXM dense bf16). Each number is the median step time over the measured
steps after warm-up steps (compilation happens in the first).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback

import torch

PEAK_FLOPS = {"cuda": 989e12}

SIZES = {
    # ~341M parameters: Llama-style, MHA, tied embeddings, a 32k vocabulary.
    "350m": dict(
        vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2816,
        tie_embeddings=True, qkv_bias=False, max_seq_len=2048,
    ),
    # The ds-1.5b registry entry (DeepSeek-R1-Distill-Qwen-1.5B shape), context cut to the benchmark's.
    "1.5b": dict(name="ds-1.5b", max_seq_len=2048),
    # CPU smoke test of this script.
    "tiny": dict(name="ds-tiny"),
}  # fmt: skip


def model_config(size: str):
    from ds_models import ModelConfig

    spec = dict(SIZES[size])
    name = spec.pop("name", None)
    return ModelConfig.from_name(name, **spec) if name else ModelConfig(**spec)


def flops_per_token(mc, seq: int) -> tuple[float, int]:
    """6N + 12 L d T, with N the parameters that take part in matmuls (the embedding lookup does not;
    the output head does, tied or not)."""
    from ds_models import Transformer

    with torch.device("meta"):
        m = Transformer(mc)
    n_total = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    n_matmul = n_total - m.embed_tokens.weight.numel() + m.lm_head.weight.numel()
    return 6 * n_matmul + 12 * mc.n_layers * mc.d_model * seq, n_total


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, hf: bool):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (n, seq + (0 if hf else 1)), generator=g)
        self.hf = hf

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        ids = self.data[i]
        return {"input_ids": ids, "labels": ids} if self.hf else {"input_ids": ids}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def bench_ds(
    mc, mb: int, seq: int, warmup: int, steps: int, precision: str, grad_ckpt: bool, compile: bool
) -> dict:
    from ds_models import Transformer
    from ds_trainer.config import TrainConfig
    from ds_trainer.run import Run

    _reset()
    torch.manual_seed(0)
    model = Transformer(mc)
    cfg = TrainConfig.from_dict(
        {
            "output_dir": tempfile.mkdtemp(prefix="bench-ds-"),
            "model": {"gradient_checkpointing": grad_ckpt, "compile": compile},
            "data": {"seq_len": seq, "micro_batch_size": mb},
            "optim": {"lr": 3e-4, "fused": "auto"},
            "schedule": {"steps": warmup + steps, "warmup_steps": 2},
            "precision": {"dtype": precision},
            "logging": {"progress": False, "jsonl": False},
        }
    )
    run = Run(cfg, model=model, train_dataset=_Rows(mb * (warmup + steps), seq, mc.vocab_size, hf=False))
    run.setup()
    times = []
    for i in range(warmup + steps):
        batches = run._next_batches()
        run.sampler.advance()
        _sync()
        t0 = time.perf_counter()
        stats = run.train_step(batches)
        _sync()
        times.append(time.perf_counter() - t0)
        print(f"  ds {precision}{' gc' if grad_ckpt else ''} step {i}: {times[-1] * 1e3:.1f} ms loss {stats['loss']:.3f}",
              flush=True)  # fmt: skip
    fp8_linears = sum(type(m).__name__.startswith("Float8") for m in run.unwrapped().modules())
    out = {"step_s": statistics.median(times[warmup:]), "first_step_s": times[0], "peak_mem_bytes": _peak(),
           "final_loss": stats["loss"], "fp8_linears": fp8_linears}  # fmt: skip
    del run, model
    return out


def bench_hf(mc, mb: int, seq: int, warmup: int, steps: int, bf16: bool, compile: bool = False) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from ds_models.hf_import import hf_config_dict

    _reset()
    torch.manual_seed(0)
    # The HF twin of the ds config, from ds-models' own export (the inverse of import-hf):
    # LlamaForCausalLM, or Qwen2ForCausalLM where the model has q/k/v biases (ds-1.5b).
    fields = hf_config_dict(mc)
    fields.pop("architectures")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            times.append(time.perf_counter() - self.t0)
            print(f"  hf step {len(times) - 1}: {times[-1] * 1e3:.1f} ms", flush=True)

    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"),
        per_device_train_batch_size=mb,
        max_steps=warmup + steps,
        learning_rate=3e-4,
        weight_decay=0.1,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        bf16=bf16,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        torch_compile=compile,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Rows(mb * (warmup + steps), seq, mc.vocab_size, hf=True),
        callbacks=[Timer()],
    )
    trainer.train()
    out = {"step_s": statistics.median(times[warmup:]), "first_step_s": times[0], "peak_mem_bytes": _peak()}
    del trainer, model
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="350m,1.5b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", default="350m=8,1.5b=4,tiny=2", help="SIZE=N,... sequences per step")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variants", default="ds,hf,fp8,gc", help="which measurements, in order")
    p.add_argument(
        "--gc-sizes", default="350m,1.5b,tiny", help="sizes that also run with gradient checkpointing"
    )
    p.add_argument("--out", default="bench_mfu.json")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda else "fp32"
    mbs = dict(kv.split("=") for kv in args.micro_batch.split(","))
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "seq_len": args.seq,
        "peak_flops": PEAK_FLOPS.get("cuda") if cuda else None,
        "runs": {},
    }
    try:
        import accelerate
        import transformers

        results["accelerate"], results["transformers"] = accelerate.__version__, transformers.__version__
    except ImportError:
        pass

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    for size in args.sizes.split(","):
        mc = model_config(size)
        seq = min(args.seq, mc.max_seq_len)
        fpt, n_params = flops_per_token(mc, seq)
        mb = int(mbs.get(size, 1))
        entry = results["runs"].setdefault(
            size, {"params": n_params, "flops_per_token": fpt, "micro_batch": mb}
        )
        print(f"== {size}: {n_params / 1e6:.0f}M parameters, micro-batch {mb} x {seq} tokens", flush=True)
        for variant in args.variants.split(","):
            if variant == "gc" and size not in args.gc_sizes.split(","):
                continue
            if variant == "fp8" and not cuda:
                continue
            try:
                if variant in ("hf", "hf_compile"):
                    r = bench_hf(
                        mc, mb, seq, args.warmup, args.steps, bf16=cuda, compile=variant == "hf_compile"
                    )
                else:
                    r = bench_ds(
                        mc, mb, seq, args.warmup, args.steps,
                        precision="fp8" if variant == "fp8" else precision,
                        grad_ckpt=variant == "gc",
                        compile=cuda,
                    )  # fmt: skip
            except Exception as e:  # record and go on: one failure must not lose the other numbers
                traceback.print_exc()
                entry[variant] = {
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                }
                _reset()
                save()
                continue
            tokens = mb * seq
            r["tokens_per_s"] = tokens / r["step_s"]
            if cuda:
                r["mfu"] = r["tokens_per_s"] * fpt / PEAK_FLOPS["cuda"]
            entry[variant] = r
            print(f"   {variant}: {r['tokens_per_s']:,.0f} tok/s"
                  + (f", MFU {100 * r['mfu']:.1f}%" if cuda else "")
                  + f", peak {r['peak_mem_bytes'] / 2**30:.1f} GiB", flush=True)  # fmt: skip
            save()
        if (
            "ds" in entry
            and "hf" in entry
            and "tokens_per_s" in entry["ds"]
            and "tokens_per_s" in entry["hf"]
        ):
            entry["ds_over_hf"] = entry["ds"]["tokens_per_s"] / entry["hf"]["tokens_per_s"]
        if (
            "fp8" in entry
            and "tokens_per_s" in entry.get("fp8", {})
            and "tokens_per_s" in entry.get("ds", {})
        ):
            entry["fp8_speedup"] = entry["fp8"]["tokens_per_s"] / entry["ds"]["tokens_per_s"]
        if (
            "gc" in entry
            and "peak_mem_bytes" in entry.get("gc", {})
            and "peak_mem_bytes" in entry.get("ds", {})
        ):
            entry["gc_memory_saving"] = 1 - entry["gc"]["peak_mem_bytes"] / max(
                1, entry["ds"]["peak_mem_bytes"]
            )
            entry["gc_throughput_ratio"] = entry["gc"]["tokens_per_s"] / entry["ds"]["tokens_per_s"]
        save()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
