"""The batch-1 dense decode step compiled with inductor's matrix-vector reductions
(generate.GEMV_COMPILE_OPTIONS) gives the eager step's greedy tokens; larger batches and wider models
keep the plain compiled step."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from ds_models import generate

gen = sys.modules["ds_models.generate"]  # the package re-exports the function under the module's name


def test_compile_mode_dispatch_and_tokens_on_cpu(make_model, monkeypatch):
    # On CPU inductor leaves the matmuls alone; this checks which compiled step each call gets, that
    # the options are valid torch.compile options (a typo raises at compile time), and the tokens.
    model = make_model()
    one, two = [[26, 5, 35, 89, 79]], [[3, 141, 59], [26, 5, 35, 89, 79]]
    gen._compiled.pop("dense-gemv", None)
    gen._compiled.pop("dense", None)
    assert generate(model, one, 6, mode="compile") == generate(model, one, 6, mode="eager")
    assert "dense-gemv" in gen._compiled and "dense" not in gen._compiled
    assert generate(model, two, 6, mode="compile") == generate(model, two, 6, mode="eager")
    assert "dense" in gen._compiled
    # A model wider than GEMV_MAX_D_MODEL keeps the plain step at batch 1 too.
    monkeypatch.setattr(gen, "GEMV_MAX_D_MODEL", model.config.d_model - 1)
    gen._compiled.pop("dense-gemv")
    assert generate(model, one, 6, mode="compile") == generate(model, one, 6, mode="eager")
    assert "dense-gemv" not in gen._compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prompt", [[3, 141, 59], [26, 5, 35, 89, 79], list(range(1, 40))])
def test_gpu_batch1_compiled_decode_matches_eager(make_model, prompt):
    model = make_model().cuda()
    assert generate(model, [prompt], 16, mode="compile") == generate(model, [prompt], 16, mode="eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batch1_bf16_step_as_accurate_as_eager(make_model):
    # In bf16 the reductions sum in another order than cuBLAS, so tokens on near-ties may differ;
    # instead, one step's logits must be about as close to the float32 step as eager bf16's are
    # (a wrong result is off by ~100%, bf16 rounding by ~2%).
    model32 = make_model().cuda()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    prompt = torch.tensor([[26, 5, 35, 89, 79]], device="cuda")

    def one_step(model, mode):
        dtype = model.embed_tokens.weight.dtype
        cache = gen.KVCache(model.config, 1, 256, device="cuda", dtype=dtype)
        cache.fixed_shapes = mode == "compile"
        for layer in model.layers:
            layer.self_attn.fuse_qkv()
        with torch.no_grad():
            gen._prefill(model, cache, prompt, None)
            step = gen._compiled_decode_step if mode == "compile" else gen._decode_step
            pos = torch.tensor([prompt.shape[1]], device="cuda")
            return step(model, cache, torch.tensor([[7]], device="cuda"), pos).clone()

    ref = one_step(model32, "eager")
    err = {m: float(torch.linalg.vector_norm(one_step(model16, m) - ref) / torch.linalg.vector_norm(ref))
           for m in ("eager", "compile")}  # fmt: skip
    assert err["compile"] < max(2 * err["eager"], 1e-2), err
