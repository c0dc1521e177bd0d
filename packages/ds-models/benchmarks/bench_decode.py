"""Decode throughput of ds models (random weights, bf16) next to HF transformers on the same weights.

    PYTHONPATH=packages/ds-core/src:packages/ds-models/src \\
        python packages/ds-models/benchmarks/bench_decode.py --out results.json

Cases (issue 4 targets in brackets):
  1.5b        ds-1.5b, batch 1                 [>= 575 tok/s, >= 50x HF generate in the same run]
  7b          ds-7b, batch 1                   [>= 130 tok/s]
  7b-hf       HF transformers generate on the ds-7b weights, batch 1 (the issue's 11.9 tok/s)
  7b-b16      ds-7b, batch 16                  [>= 8x the batch-1 throughput]
  7b-sparse   ds-7b, sparse_ratio 0.3 + attention_sparse_ratio 0.3 (same weights, dynamic mode,
              thresholds calibrated on a random prefill), batch 1   [>= 1.25x dense 7b]
              (decode steps in graph modes attend densely: see docs/packages/ds-models.md)
  tiny        ds-tiny on CPU, a smoke test of this script

Throughput: a prompt of --prompt-len random tokens per row, --new-tokens generated greedily (no
stop). "decode tok/s" = B * (N - 1) / (t(N tokens) - t(1 token)), i.e. the steady per-token rate
without the prefill; "e2e tok/s" = B * N / t(N tokens). Each number is the median of --repeats
timed calls after one untimed warm-up call (which compiles / captures). HF's number is
`model.generate` end to end (its defaults, SDPA attention, bf16), tokens / wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from ds_models import ModelConfig, Transformer, generate
from ds_models.hf_import import export_hf_state_dict, hf_config_dict


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, prompts, n, mode):
    sync()
    t0 = time.perf_counter()
    out = generate(model, prompts, n, mode=mode)  # returns lists: the device is synced
    return time.perf_counter() - t0, out


def measure(model, batch, prompt_len, new_tokens, mode, repeats):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    t_warm = time.perf_counter()
    generate(model, prompts, new_tokens, mode=mode)  # compile / capture
    warmup_s = time.perf_counter() - t_warm
    full, first = [], []
    out = None
    for _ in range(repeats):
        t, out = timed_generate(model, prompts, new_tokens, mode)
        full.append(t)
        first.append(timed_generate(model, prompts, 1, mode)[0])
    t_full, t_first = statistics.median(full), statistics.median(first)
    return dict(
        batch=batch,
        mode=mode,
        new_tokens=new_tokens,
        decode_tok_s=batch * (new_tokens - 1) / (t_full - t_first),
        e2e_tok_s=batch * new_tokens / t_full,
        ms_per_step=1000 * (t_full - t_first) / (new_tokens - 1),
        warmup_s=warmup_s,
        tokens=out[0][:16],
    )


def random_model(name, device, dtype, **overrides):
    torch.manual_seed(0)
    config = ModelConfig.from_name(name, **overrides)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def hf_baseline(model, prompt_len, new_tokens, repeats):
    """HF transformers' model on the very same weights (mapped back to HF names)."""
    import transformers

    cfg = hf_config_dict(model.config)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device(model.embed_tokens.weight.device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=model.embed_tokens.weight.dtype)
    hf.load_state_dict(export_hf_state_dict(model), strict=True)
    hf.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(hf.device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, **kw)  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = hf.generate(ids, **kw)
            sync()
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    result = dict(e2e_tok_s=new_tokens / t, new_tokens=new_tokens, tokens=out[0, prompt_len:][:16].tolist())
    del hf
    return result


def matmul_floor_ms(model, batch=1, reps=20):
    """One decode step's matmuls alone (every Linear of every layer + lm_head), in one CUDA graph.

    What the step would cost if everything but the weight reads were free; the gap to the measured
    step is attention, norms, RoPE, cache writes and launch gaps.
    """
    d = model.config.d_model
    layers = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        layers.append((qkv, a.o_proj.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight))
    x = torch.randn(batch, d, device="cuda", dtype=model.lm_head.weight.dtype)
    h = torch.randn(batch, model.config.d_ff, device="cuda", dtype=x.dtype)
    o = torch.randn(batch, model.config.n_heads * model.config.head_dim, device="cuda", dtype=x.dtype)

    def step():
        for qkv, wo, wg, wu, wd in layers:
            torch.nn.functional.linear(x, qkv)
            torch.nn.functional.linear(o, wo)
            torch.nn.functional.linear(x, wg)
            torch.nn.functional.linear(x, wu)
            torch.nn.functional.linear(h, wd)
        torch.nn.functional.linear(x, model.lm_head.weight)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def calibrate(model, device, n_tokens=512):
    import ds_core

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=g).to(device)
    with ds_core.calibration(model), torch.no_grad():
        model(ids)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="1.5b,7b,7b-hf,7b-b16,7b-sparse")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--hf-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="compile,cuda-graph", help="decode modes measured for dense models")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args()
    cases = args.cases.split(",")
    modes = args.modes.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass

    def record(name, value):
        results[name] = value
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(value)}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    def run_modes(label, model, batch, modes_here):
        for mode in modes_here:
            try:
                record(
                    f"{label}/{mode}",
                    measure(model, batch, args.prompt_len, args.new_tokens, mode, args.repeats),
                )
            except Exception as e:  # keep the other cases' numbers
                record(f"{label}/{mode}", {"error": f"{type(e).__name__}: {e}"[:500]})

    if "tiny" in cases:  # smoke test of this script (CPU is fine)
        model = random_model("ds-tiny", device, dtype)
        run_modes("tiny-b1", model, 1, ["eager"])
        record("tiny-hf", hf_baseline(model, args.prompt_len, args.hf_new_tokens, 1))
        sparse = random_model("ds-tiny", device, dtype, sparse_ratio=0.3, attention_sparse_ratio=0.3)
        sparse.load_state_dict(model.state_dict(), strict=False)
        calibrate(sparse, device, n_tokens=128)
        run_modes("tiny-sparse-b1", sparse, 1, ["eager"])

    if "1.5b" in cases:
        model = random_model("ds-1.5b", device, dtype)
        record("1.5b-weights-GB", weight_bytes(model) / 1e9)
        record("1.5b-hf", hf_baseline(model, args.prompt_len, args.hf_new_tokens, args.repeats))
        if device == "cuda":
            record("1.5b-matmul-floor-ms", matmul_floor_ms(model))
        run_modes("1.5b-b1", model, 1, modes)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    if any(c.startswith("7b") for c in cases):
        model = random_model("ds-7b", device, dtype)
        record("7b-weights-GB", weight_bytes(model) / 1e9)
        if device == "cuda":
            record("7b-matmul-floor-ms", matmul_floor_ms(model))
        if "7b" in cases:
            run_modes("7b-b1", model, 1, modes)
        if "7b-hf" in cases:
            record("7b-hf", hf_baseline(model, args.prompt_len, args.hf_new_tokens, 1))
            gc.collect()
            torch.cuda.empty_cache()
        if "7b-b16" in cases:
            run_modes("7b-b16", model, 16, modes[:1])
        if "7b-sparse" in cases:
            state = {k: v for k, v in model.state_dict().items()}
            sparse = random_model("ds-7b", device, dtype, sparse_ratio=0.3, attention_sparse_ratio=0.3)
            sparse.load_state_dict(state, strict=False)  # the dense model's weights; thresholds next
            del model, state
            gc.collect()
            torch.cuda.empty_cache()
            calibrate(sparse, device)
            run_modes("7b-sparse-b1", sparse, 1, ["compile", "cuda-graph"] if device == "cuda" else ["eager"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
