"""The one-token decode step on ds_core's kernels: dense device-length attention (every mode), and
the Triton GEMVs of generate's compiled / captured batch-1 steps (q/k/v with bias, down with
SiLU·up). On CPU the Triton kernels run in the interpreter (float32)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from ds_models import generate

gen = sys.modules["ds_models.generate"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton on a GPU or in the interpreter",
)


def _prefill_then_step(model, prompt, kernels=frozenset(), fixed=False):
    """Logits (1, vocab) of one decode step after the prompt, and the cache it wrote."""
    cache = gen.KVCache(model.config, 1, 64, device=DEVICE, dtype=model.embed_tokens.weight.dtype)
    ids = torch.tensor([prompt], device=DEVICE)
    with torch.no_grad():
        gen._prefill(model, cache, ids, None)
        if fixed:
            for layer in model.layers:
                layer.self_attn.fuse_qkv()
        cache.fixed_shapes, cache.kernels = fixed, frozenset(kernels)
        pos = torch.tensor([len(prompt)], device=DEVICE)
        logits = gen._decode_step(model, cache, torch.tensor([[7]], device=DEVICE), pos)
    return logits, cache


def test_dense_decode_step_equals_cache_free_forward(make_model):
    # The decode step attends through ds_core.dense_decode_attention (no mask); a left-padded row
    # (kv_start > 0) must see only its own tokens.
    model = make_model().to(DEVICE)
    prompt = [26, 5, 35, 89, 79]
    logits, _ = _prefill_then_step(model, prompt)
    with torch.no_grad():
        ref = model(torch.tensor([[*prompt, 7]], device=DEVICE))[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    rows = [[3, 141, 59], prompt]
    assert generate(model, rows, 8, mode="eager") == [generate(model, [r], 8, mode="eager")[0] for r in rows]


@needs_triton
@pytest.mark.parametrize("kernels", [("qkv",), ("down",), ("qkv", "down")])
def test_step_kernels_match_the_plain_step(make_model, kernels):
    from ds_core.kernels import triton_gemv  # noqa: F401  registers the op

    model = make_model().to(DEVICE)
    prompt = [26, 5, 35, 89, 79, 3]
    ref, ref_cache = _prefill_then_step(model, prompt, fixed=True)
    got, cache = _prefill_then_step(model, prompt, kernels, fixed=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_step_kernel_choice(make_model, monkeypatch):
    model = make_model()
    assert gen._step_kernels(model, 1, "compile") == frozenset()  # CPU: never
    if torch.cuda.is_available():
        model = model.cuda()
        assert gen._step_kernels(model, 1, "compile") == frozenset(gen.STEP_KERNELS)
        assert gen._step_kernels(model, 2, "compile") == frozenset()
        assert gen._step_kernels(model, 1, "eager") == frozenset()
        monkeypatch.setenv("DS_MODELS_STEP_KERNELS", "none")
        assert gen._step_kernels(model, 1, "compile") == frozenset()
        monkeypatch.setenv("DS_MODELS_STEP_KERNELS", "qkv,bogus")
        with pytest.raises(gen.ModelError, match="DS_MODELS_STEP_KERNELS: unknown kernel 'bogus'"):
            gen._step_kernels(model, 1, "compile")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", ["qkv,down", "none"])
@pytest.mark.parametrize("mode", ["compile", "cuda-graph"])
def test_gpu_step_kernels_tokens_equal_eager(make_model, monkeypatch, kernels, mode):
    monkeypatch.setenv("DS_MODELS_STEP_KERNELS", kernels)
    model = make_model().cuda()
    prompt = [[26, 5, 35, 89, 79]]
    assert generate(model, prompt, 16, mode=mode) == generate(model, prompt, 16, mode="eager")
