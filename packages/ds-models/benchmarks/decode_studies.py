"""Kernel-level studies behind the ds-1.5b decode numbers (bench_decode.py cases "1.5b-tune",
"1.5b-kernels" and "tiny-check"): cuBLAS against Triton GEMVs per weight shape, ds-core's decode
kernels against what they replace, inductor settings of the whole step, and where greedy tokens
first differ from eager. Imported by bench_decode.py; results in docs/benchmarks/ds-models.md.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch
from decode_timing import graph_ms, measure, sync

from ds_models import ModelConfig, Transformer, generate

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
        ms = graph_ms(functools.partial(run_cublas, x, ws))
        row = {"N": N, "K": K, "calls": len(ws), "cublas_us": 1000 * ms / len(ws), "cublas_TBps": gb / ms}
        best = None
        for cfg in configs:
            if cfg[1] <= K:
                t = graph_ms(functools.partial(run_triton, x, ws, ys, cfg))
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
            row = {"mask+sdpa_us": 1000 * graph_ms(old) / n, "max_abs_diff": err}
            for split in ("0", "64", "128", "256", "1024"):  # slots per program (0: the default)
                os.environ["DS_CORE_DECODE_SPLIT"] = split
                row[f"ds_core_split{split}_us"] = 1000 * graph_ms(new) / n
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
            "cublas_us": 1000 * graph_ms(cublas) / len(ws),
            "cublas_TBps": gb / graph_ms(cublas),
        }
        for blocks in ("", "1x512", "1x1024", "2x1024", "2x2048", "4x1024", "4x512"):
            os.environ["DS_CORE_GEMV_BLOCKS"] = blocks
            try:
                ms = graph_ms(triton)
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
