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
import functools
import gc
import json
import os
import statistics
import sys
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

    return _graph_ms(step, reps)


# ---- ds-1.5b tuning (case "1.5b-tune") ------------------------------------------------------------

# torch.compile options of the dense batch-1 decode step tried by --variants ("ro" = reduce-overhead,
# the setting before; "cd" = ds_models.generate.GEMV_COMPILE_OPTIONS today).
VARIANTS = {
    "ro": {"triton.cudagraphs": True},
    "cd": {"triton.cudagraphs": True, "coordinate_descent_tuning": True},
    "cd-all": {
        "triton.cudagraphs": True,
        "coordinate_descent_tuning": True,
        "coordinate_descent_check_all_directions": True,
        "aggressive_fusion": True,
    },
    "cd-ma": {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "max_autotune": True},
}


def _triton_gemv():
    """A plain Triton y = W x (W (N, K) row-major, bf16, fp32 accumulation): the yardstick for cuBLAS."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0
            )
            acc += w.to(tl.float32) * x[None, :]
        tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rn < N)

    def gemv(x, w, y, block_n, block_k, warps):
        N, K = w.shape
        kernel[(triton.cdiv(N, block_n),)](x, w, y, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)

    return gemv


def _graph_ms(fn, reps=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def gemv_table(model):
    """Per weight shape of one decode step: cuBLAS (F.linear) vs a plain Triton GEMV, each over the
    model's own per-layer weights in one CUDA graph (no L2 reuse between calls), plus max |diff|."""
    gemv = _triton_gemv()
    per_layer = {
        "qkv": [torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]) for b in model.layers],
        "o": [b.self_attn.o_proj.weight for b in model.layers],
        "gate": [b.mlp.gate_proj.weight for b in model.layers],
        "gate+up": [torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]) for b in model.layers],
        "down": [b.mlp.down_proj.weight for b in model.layers],
        "lm_head": [model.lm_head.weight],
    }  # fmt: skip
    configs = [(1, 1024, 4), (2, 512, 4), (4, 512, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8), (32, 128, 8)]

    def run_cublas(x, ws):
        for w in ws:
            torch.nn.functional.linear(x[None], w)

    def run_triton(x, ws, ys, cfg):
        for w, y in zip(ws, ys):
            gemv(x, w, y, *cfg)

    rows = {}
    for name, ws in per_layer.items():
        N, K = ws[0].shape
        x = torch.randn(K, device="cuda", dtype=ws[0].dtype)
        ys = [torch.full((N,), float("nan"), device="cuda", dtype=x.dtype) for _ in ws]
        gb = sum(w.numel() * w.element_size() for w in ws) / 1e9
        ms = _graph_ms(functools.partial(run_cublas, x, ws))
        row = {"N": N, "K": K, "calls": len(ws), "cublas_us": 1000 * ms / len(ws), "cublas_TBps": gb / ms}
        best = None
        for cfg in configs:
            if cfg[1] <= K:
                t = _graph_ms(functools.partial(run_triton, x, ws, ys, cfg))
                if best is None or t < best[0]:
                    best = (t, cfg)
        ref = torch.nn.functional.linear(x[None], ws[0]).float()[0]
        ys[0].fill_(float("nan"))
        gemv(x, ws[0], ys[0], *best[1])
        row.update(triton_us=1000 * best[0] / len(ws), triton_TBps=gb / best[0], triton_cfg=list(best[1]),
                   max_abs_diff=float((ys[0].float() - ref).abs().max()))  # fmt: skip
        rows[name] = row
    return rows


def kernel_table(model, lengths=(17, 144)):
    """(case "1.5b-kernels") Per-layer decode kernels of ds-1.5b, each over the 28 layers' own
    weights / caches in one CUDA graph (no L2 reuse between layers), microseconds per layer."""
    import torch.nn.functional as F

    from ds_core import dense_decode_attention
    from ds_core.kernels import triton_gemv
    from ds_models.model import _masked_gqa_attention, attention_bias

    cfg, n = model.config, len(model.layers)
    dt = model.lm_head.weight.dtype
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rows = {}
    for S, lens in ((256, lengths), (4096, (4000,))):
        ks = [torch.randn(1, K, S, D, device="cuda", dtype=dt) for _ in range(n)]
        vs = [torch.randn(1, K, S, D, device="cuda", dtype=dt) for _ in range(n)]
        q = torch.randn(1, H, 1, D, device="cuda", dtype=dt)
        pad = torch.zeros(1, dtype=torch.long, device="cuda")
        for L in lens:
            pos = torch.tensor([L - 1], device="cuda")
            length = pos + 1

            def old(
                S=S, ks=ks, vs=vs, pos=pos, pad=pad, q=q
            ):  # what model.hidden + Attention did per step: mask once, masked SDPA per layer
                slots = torch.arange(S, device="cuda")
                m = (slots[None, None, :] <= pos[None, :, None]) & (
                    slots[None, None, :] >= pad[:, None, None]
                )
                bias = attention_bias(m[:, None], H // K, dt)
                for k, v in zip(ks, vs):
                    _masked_gqa_attention(q, k, v, bias)

            def new(ks=ks, vs=vs, length=length, pad=pad, q=q):
                for k, v in zip(ks, vs):
                    dense_decode_attention(q, k, v, length, pad)

            ref = _masked_gqa_attention(q, ks[0], vs[0], attention_bias(
                (torch.arange(S, device="cuda") < L)[None, None, None], H // K, dt))  # fmt: skip
            err = float((dense_decode_attention(q, ks[0], vs[0], pos + 1, pad) - ref).abs().max())
            row = {"mask+sdpa_us": 1000 * _graph_ms(old) / n, "max_abs_diff": err}
            for split in ("0", "64", "128", "256", "1024"):  # slots per program (0: the default)
                os.environ["DS_CORE_DECODE_SPLIT"] = split
                row[f"ds_core_split{split}_us"] = 1000 * _graph_ms(new) / n
            os.environ.pop("DS_CORE_DECODE_SPLIT")
            rows[f"attention S={S} len={L}"] = row
        del ks, vs
    x = torch.randn(1, cfg.d_model, device="cuda", dtype=dt)
    hid = torch.randn(1, cfg.d_ff, device="cuda", dtype=dt)
    up = torch.randn(1, cfg.d_ff, device="cuda", dtype=dt)
    attn_in = torch.randn(1, H * D, device="cuda", dtype=dt)
    qkv = [
        torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight])
        for b in model.layers
    ]
    qkv_b = [
        torch.cat([b.self_attn.q_proj.bias, b.self_attn.k_proj.bias, b.self_attn.v_proj.bias])
        for b in model.layers
    ]
    shapes = {
        "qkv+bias": (x, [(w, bb) for w, bb in zip(qkv, qkv_b)], None),
        "o": (attn_in, [(b.self_attn.o_proj.weight, None) for b in model.layers], None),
        "gate": (x, [(b.mlp.gate_proj.weight, None) for b in model.layers], None),
        "down": (hid, [(b.mlp.down_proj.weight, None) for b in model.layers], None),
        "down+silu*up": (hid, [(b.mlp.down_proj.weight, None) for b in model.layers], up),
        "lm_head": (x, [(model.lm_head.weight, None)], None),
    }  # fmt: skip
    for name, (inp, ws, u) in shapes.items():

        def cublas(inp=inp, ws=ws, u=u):
            a = inp if u is None else F.silu(inp) * u
            for w, bb in ws:
                F.linear(a, w, bb)

        def triton(inp=inp, ws=ws, u=u):
            for w, bb in ws:
                triton_gemv.gemv(inp, w, bb, u)

        N, Kd = ws[0][0].shape
        gb = sum(w.numel() * w.element_size() for w, _ in ws) / 1e9
        row = {
            "N": N,
            "K": Kd,
            "cublas_us": 1000 * _graph_ms(cublas) / len(ws),
            "cublas_TBps": gb / _graph_ms(cublas),
        }
        for blocks in ("", "1x512", "1x1024", "2x1024", "2x2048", "4x1024", "4x512"):
            os.environ["DS_CORE_GEMV_BLOCKS"] = blocks
            try:
                ms = _graph_ms(triton)
                row[f"triton_{blocks or 'default'}_us"] = 1000 * ms / len(ws)
            except Exception as e:
                row[f"triton_{blocks}"] = f"{type(e).__name__}: {e}"[:200]
        os.environ.pop("DS_CORE_GEMV_BLOCKS", None)
        a = inp if u is None else F.silu(inp) * u
        row["max_abs_diff"] = float((triton_gemv.gemv(inp, *ws[0], u) - F.linear(a, *ws[0])).abs().max())
        rows[name] = row
    return rows


def kernel_profile(model, prompts, n, path, top=25):
    """Per-kernel device time of a generate call (graph replays included), top kernels to `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, prompts, n, mode="compile")
        sync()
    table = prof.key_averages().table(
        sort_by="self_device_time_total", row_limit=top, max_name_column_width=70
    )
    with open(path, "w") as f:
        f.write(table)
    return table


def tune_variants(model, args, record):
    """The full decode step (mode "compile") under each inductor setting of --variants, same model."""
    gen = sys.modules["ds_models.generate"]  # the package re-exports the function under that name
    default = dict(gen.GEMV_COMPILE_OPTIONS)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=g).tolist()
    eager = generate(model, prompts, 32, mode="eager")[0]
    record("1.5b-tune/eager-tokens", eager[:16])
    t_start = time.perf_counter()
    try:
        for name in args.variants.split(","):
            if time.perf_counter() - t_start > args.tune_budget_s:
                record(f"1.5b-tune/{name}", {"skipped": f"past --tune-budget-s {args.tune_budget_s}"})
                continue
            gen.GEMV_COMPILE_OPTIONS = VARIANTS[name]
            gen._compiled.pop("dense-gemv", None)
            torch._dynamo.reset()
            try:
                r = measure(model, 1, args.prompt_len, args.new_tokens, "compile", args.repeats)
                out = generate(model, prompts, 32, mode="compile")[0]
                agree = next((i for i, (a, b) in enumerate(zip(out, eager)) if a != b), len(out))
                r.update(options=VARIANTS[name], tokens_equal_to_eager=agree)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"[:500]}
            record(f"1.5b-tune/{name}", r)
            if args.profile_dir and "error" not in r:
                try:
                    kernel_profile(model, prompts, 33, f"{args.profile_dir}/profile_{name}.txt")
                except Exception as e:
                    print(f"profile {name}: {type(e).__name__}: {e}"[:300])
    finally:
        gen.GEMV_COMPILE_OPTIONS = default
        gen._compiled.pop("dense-gemv", None)
        torch._dynamo.reset()


def tiny_check(record):
    """(case "tiny-check") The GPU test's float32 ds-tiny (weights N(0, 0.3)) under each batch-1 /
    batch-2 setting of VARIANTS: first token that differs from eager, and eager's top-2 logit gap there
    (a near-tie flips on rounding; a wide gap means a wrong result)."""
    gen = sys.modules["ds_models.generate"]
    saved = dict(gen.GEMV_COMPILE_OPTIONS), dict(gen.DENSE_COMPILE_OPTIONS)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("ds-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model = model.eval().cuda()
    cases = {"b1": [[26, 5, 35, 89, 79]], "b2": [[3, 141, 59], [26, 5, 35, 89, 79]]}
    try:
        for name in ("ro", "cd"):
            gen.GEMV_COMPILE_OPTIONS = gen.DENSE_COMPILE_OPTIONS = VARIANTS[name]
            gen._compiled.pop("dense-gemv", None)
            gen._compiled.pop("dense", None)
            torch._dynamo.reset()
            for label, prompts in cases.items():
                eager = generate(model, prompts, 16, mode="eager")
                try:
                    got = generate(model, prompts, 16, mode="compile")
                except Exception as e:
                    record(f"tiny-check/{name}/{label}", {"error": f"{type(e).__name__}: {e}"[:400]})
                    continue
                rows = []
                for prompt, e_row, g_row in zip(prompts, eager, got):
                    i = next((j for j, (a, b) in enumerate(zip(e_row, g_row)) if a != b), None)
                    gap = None
                    if i is not None:
                        with torch.no_grad():
                            logits = model(torch.tensor([prompt + e_row[:i]], device="cuda"))[0, -1]
                        top = logits.topk(2).values
                        gap = float(top[0] - top[1])
                    rows.append({"first_diff": i, "eager_top2_gap_there": gap})
                record(f"tiny-check/{name}/{label}", rows)
    finally:
        gen.GEMV_COMPILE_OPTIONS, gen.DENSE_COMPILE_OPTIONS = saved
        gen._compiled.clear()
        torch._dynamo.reset()


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
        out[name] = _graph_ms(fn, reps)
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
            out[f"sparse_ms[{variant}]"] = _graph_ms(sparse, reps)
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
