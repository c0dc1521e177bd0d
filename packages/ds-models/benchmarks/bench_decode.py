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
              (--sparse-projections all: the attention's q/k/v/o skip activations too, TEAL)
              (every mode runs ds-core's sparse attention with the length on the device)
  7b-attn     (CUDA, with --contexts) one step's attention alone, all 30 layers, dense vs sparse
  --contexts 8192,16384   adds the 7b and 7b-sparse cases again with prompts of these lengths
              (labels "...-ctx8192"), where the KV cache is a real share of the bytes a step
              reads; "7b-ideal-ctx<N>" records the bytes-read bound of the sparse speedup there
  tiny        ds-tiny on CPU, a smoke test of this script
  1.5b-tune   (CUDA) ds-1.5b batch 1, one table per run: cuBLAS GEMV per weight shape next to a
              plain Triton GEMV, then the full decode step under each inductor setting of
              --variants, with a per-kernel profile of each (--profile-dir) and the greedy tokens
              against eager
  1.5b-kernels (CUDA) ds-1.5b's per-layer decode kernels, 28 layers in one CUDA graph: ds_core's
              dense decode attention vs the mask + SDPA it replaces, ds_core's Triton GEMV (with
              its bias / SiLU·up fusions) vs cuBLAS, per weight shape
  --kernel-variants qkv,down:none   the 1.5b case once per DS_MODELS_STEP_KERNELS setting (":"-separated)
  tiny-check  (CUDA) the GPU test's float32 ds-tiny in "compile" mode under each setting: where its
              greedy tokens first differ from eager's, and how close eager's top two logits are there

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
import os
import statistics
import sys
import time

import torch
from decode_studies import VARIANTS, gemv_table, kernel_profile, kernel_table, tiny_check, tune_variants
from decode_timing import graph_ms, measure, sync

from ds_models import ModelConfig, Transformer
from ds_models.hf_import import export_hf_state_dict, hf_config_dict


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

    return graph_ms(step, reps)


def ideal_bound(config, prompt_len, new_tokens, mlp_ratio=0.3, attention_ratio=0.3, projections="mlp"):
    """Bytes one decode step reads, dense vs sparse (bf16), averaged over the generated tokens.

    Weights read per step: every Linear (q/k/v/o, gate/up/down, lm_head), not the embedding table
    (one row). KV: 2 (K and V) x layers x KV heads x head_dim x 2 bytes per cached token. Sparse:
    the MLP reads (1 - mlp_ratio) of its weights (with projections "all" the attention's q/k/v/o
    too); attention reads the kept blocks of ds-core's
    budget (sinks + window + ceil((1 - ratio) x visible blocks), blocks of 64) plus the pooled-key
    cache (1/64 of K). Everything else (norms, activations, launch gaps) is taken as free.
    """
    from ds_core.kernels.reference_attention import decode_count_table

    c = config
    bs = 64
    attn_w = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model
    mlp_w = 3 * c.d_model * c.d_ff
    head = c.vocab_size * c.d_model
    weights = 2 * (c.n_layers * (attn_w + mlp_w) + head)
    mlp = 2 * c.n_layers * mlp_w
    kv_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2
    lengths = range(prompt_len + 1, prompt_len + new_tokens)
    table = decode_count_table(
        -(-lengths[-1] // bs),
        sink_blocks=1,
        local_blocks=2,
        keep_fraction=1 - attention_ratio,
        keep_blocks=None,
    )
    kv_dense = sum(kv_token * n for n in lengths) / len(lengths)
    kv_sparse = sum(
        kv_token * min(n, int(table[-(-n // bs)]) * bs) + kv_token / 2 * (n // bs) for n in lengths
    )
    kv_sparse /= len(lengths)
    dense = weights + kv_dense
    skipped = mlp + (2 * c.n_layers * attn_w if projections == "all" else 0)
    sparse = weights - mlp_ratio * skipped + kv_sparse
    return dict(
        weights_GB=weights / 1e9,
        mlp_GB=mlp / 1e9,
        kv_MB_per_token=kv_token / 1e6,
        dense_GB_per_step=dense / 1e9,
        sparse_GB_per_step=sparse / 1e9,
        bound=dense / sparse,
    )


def attention_step_ms(config, prompt_len, new_tokens, ratio=0.3, reps=20):
    """The attention of one decode step alone, every layer, in one CUDA graph: dense vs sparse.

    Dense is the masked SDPA that ds-models' captured step runs for a dense model; sparse is
    ds-core's device-length decode (scores + selection, then the kept blocks), with a pooled-key
    cache. Cache of generate's size (rounded to 256), valid length prompt_len + new_tokens / 2.
    """
    from ds_core import SparsityConfig, sparse_attention
    from ds_core.kernels.reference_attention import pool_keys
    from ds_models.model import _masked_gqa_attention, attention_bias

    c = config
    S = -(-(prompt_len + new_tokens) // 256) * 256
    n = prompt_len + new_tokens // 2
    kw = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, c.n_heads, 1, c.head_dim, **kw)
    ks = [torch.randn(1, c.n_kv_heads, S, c.head_dim, **kw) for _ in range(c.n_layers)]
    vs = [torch.randn(1, c.n_kv_heads, S, c.head_dim, **kw) for _ in range(c.n_layers)]
    pooled = [pool_keys(k, 64).to(torch.bfloat16) for k in ks]
    length, start = torch.tensor([n], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda")
    allowed = (torch.arange(S, device="cuda") < n).view(1, 1, 1, S)
    bias = attention_bias(allowed, c.n_heads // c.n_kv_heads, torch.bfloat16)
    cfg = SparsityConfig(attention_sparse_ratio=ratio)

    def dense():
        for k, v in zip(ks, vs):
            _masked_gqa_attention(q, k, v, bias)

    def sparse():
        for k, v, p in zip(ks, vs, pooled):
            sparse_attention(q, k, v, sparsity=cfg, kv_length=length, kv_start=start, pooled_k=p)

    out = {"cache_slots": S, "length": n}
    for name, fn in (("dense_ms", dense), ("sparse_ms", sparse)):
        out[name] = graph_ms(fn, reps)
    # DS_ATTN_VARIANTS="ticket;W=8,st=2;dot=0": the sparse step again under each setting of
    # ds-core's decode knobs (kernels.triton_attention.DECODE_TUNING), to sweep them in one device
    # call. Keys: ticket / rank (path), W (blocks per program), CH (blocks per tile), w (warps),
    # st (stages), sp (ticket splits), dot (=0 / =1: tl.dot or the CUDA cores)
    from ds_core.kernels import triton_attention as ta

    names = {
        "W": "blocks_per_program",
        "CH": "chunk_blocks",
        "w": "num_warps",
        "st": "num_stages",
        "sp": "splits",
    }
    saved = dict(ta.DECODE_TUNING)
    for variant in filter(None, os.environ.get("DS_ATTN_VARIANTS", "").split(";")):
        ta.DECODE_TUNING.update(saved)
        for item in variant.split(","):
            key, _, val = item.partition("=")
            if key in ("ticket", "rank"):
                ta.DECODE_TUNING["path"] = key
            elif key == "dot":
                ta.DECODE_TUNING["dot"] = val == "1"
            else:
                ta.DECODE_TUNING[names[key]] = int(val)
        try:
            out[f"sparse_ms[{variant}]"] = graph_ms(sparse, reps)
        except Exception as e:  # a variant that fails to compile is recorded, not fatal
            out[f"sparse_ms[{variant}]"] = f"{type(e).__name__}: {str(e)[:200]}"
    ta.DECODE_TUNING.update(saved)
    return out


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
    p.add_argument(
        "--sparse-projections",
        choices=["mlp", "all"],
        default="mlp",
        help="7b-sparse: sparse_ratio on the MLP only, or on the attention's q/k/v/o too",
    )
    p.add_argument("--contexts", default="", help="extra prompt lengths for the 7b / 7b-sparse cases")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument(
        "--variants", default="ro,cd", help=f"1.5b-tune: inductor settings, of {','.join(VARIANTS)}"
    )
    p.add_argument("--tune-budget-s", type=float, default=240, help="1.5b-tune: start no variant after this")
    p.add_argument("--profile-dir", default=None, help="1.5b-tune / 1.5b: write per-kernel profiles here")
    p.add_argument("--skip-hf", action="store_true", help="1.5b: no HF transformers baseline")
    p.add_argument(
        "--kernel-variants", default="", help="1.5b: DS_MODELS_STEP_KERNELS settings, ':'-separated"
    )
    args = p.parse_args()
    cases = args.cases.split(",")
    modes = args.modes.split(",")
    contexts = [int(c) for c in args.contexts.split(",") if c]
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

    def run_modes(label, model, batch, modes_here, prompt_len=None):
        for mode in modes_here:
            try:
                record(
                    f"{label}/{mode}",
                    measure(model, batch, prompt_len or args.prompt_len, args.new_tokens, mode, args.repeats),
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
        if not args.skip_hf:
            record("1.5b-hf", hf_baseline(model, args.prompt_len, args.hf_new_tokens, args.repeats))
        if device == "cuda":
            record("1.5b-matmul-floor-ms", matmul_floor_ms(model))
        for variant in args.kernel_variants.split(":") if args.kernel_variants else [None]:
            label = "1.5b-b1"
            if variant is not None:  # DS_MODELS_STEP_KERNELS: which projections run as ds_core's GEMV
                os.environ["DS_MODELS_STEP_KERNELS"] = variant
                sys.modules["ds_models.generate"]._compiled.clear()
                torch._dynamo.reset()
                label = f"1.5b-b1-kernels={variant}"
            run_modes(label, model, 1, modes)
            if device == "cuda" and args.profile_dir:
                g = torch.Generator().manual_seed(0)
                prompts = torch.randint(
                    0, model.config.vocab_size, (1, args.prompt_len), generator=g
                ).tolist()
                try:
                    kernel_profile(model, prompts, 33, f"{args.profile_dir}/profile_{variant}.txt")
                except Exception as e:
                    print(f"profile {variant}: {type(e).__name__}: {e}"[:300])
        del model
        gc.collect()
        torch.cuda.empty_cache()

    if "1.5b-kernels" in cases and device == "cuda":
        model = random_model("ds-1.5b", device, dtype)
        record("1.5b-kernels", kernel_table(model))
        del model
        gc.collect()
        torch.cuda.empty_cache()

    if "tiny-check" in cases and device == "cuda":
        tiny_check(record)

    if "1.5b-tune" in cases and device == "cuda":
        model = random_model("ds-1.5b", device, dtype)
        record("1.5b-matmul-floor-ms", matmul_floor_ms(model))
        record("1.5b-tune/gemv", gemv_table(model))
        tune_variants(model, args, record)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    for ctx in contexts if any(c.startswith("7b") for c in cases) else []:
        config = ModelConfig.from_name("ds-7b")
        record(
            f"7b-ideal-ctx{ctx}",
            ideal_bound(config, ctx, args.new_tokens, projections=args.sparse_projections),
        )
        if device == "cuda" and "7b-attn" in cases:
            record(f"7b-attn-ctx{ctx}", attention_step_ms(config, ctx, args.new_tokens))
            torch.cuda.empty_cache()

    if any(c in cases for c in ("7b", "7b-hf", "7b-b16", "7b-sparse")):
        model = random_model("ds-7b", device, dtype)
        record("7b-weights-GB", weight_bytes(model) / 1e9)
        if device == "cuda":
            record("7b-matmul-floor-ms", matmul_floor_ms(model))
        sparse, sparse_modes = None, ["compile", "cuda-graph"] if device == "cuda" else ["eager"]
        if "7b-sparse" in cases:
            # the dense model's weights (both models stay resident: dense and sparse are measured
            # side by side at each context); dynamic thresholds calibrated on a random prefill
            sparse = random_model(
                "ds-7b",
                device,
                dtype,
                sparse_ratio=0.3,
                attention_sparse_ratio=0.3,
                sparse_projections=args.sparse_projections,
            )
            sparse.load_state_dict(model.state_dict(), strict=False)
            calibrate(sparse, device)
        for ctx in [None, *contexts]:
            suffix = f"-ctx{ctx}" if ctx else ""
            if "7b" in cases:
                run_modes(f"7b-b1{suffix}", model, 1, modes, ctx)
            if sparse is not None:
                name = "7b-sparse" if args.sparse_projections == "mlp" else "7b-sparse-all"
                run_modes(f"{name}-b1{suffix}", sparse, 1, sparse_modes, ctx)
            gc.collect()
            torch.cuda.empty_cache()
        if "7b-hf" in cases:
            record("7b-hf", hf_baseline(model, args.prompt_len, args.hf_new_tokens, 1))
            gc.collect()
            torch.cuda.empty_cache()
        if "7b-b16" in cases:
            run_modes("7b-b16", model, 16, modes[:1])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
