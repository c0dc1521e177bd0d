from collections import Counter

import pytest
import torch

from ds_core.sparse_attention import pool_keys
from ds_models import KVCache, ModelError, generate
from ds_models.generate import sample


def _greedy_without_cache(model, prompt, n):
    """The reference: re-run the whole sequence every step, no cache, no padding."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_cache_and_no_cache_give_same_tokens(tiny_model):
    prompt = [3, 141, 59, 26, 5]
    ours = generate(tiny_model, [prompt], 20)[0]
    assert ours == _greedy_without_cache(tiny_model, prompt, 20)
    assert len(set(ours)) > 3  # the model does not just echo one token


def test_batched_ragged_prompts_equal_unbatched(tiny_model):
    prompts = [[7, 8, 9], [100, 200, 300, 400, 500, 11, 12], [42]]
    batched = generate(tiny_model, prompts, 15)
    assert batched == [generate(tiny_model, [p], 15)[0] for p in prompts]
    assert batched[1] == _greedy_without_cache(tiny_model, prompts[1], 15)


def test_tensor_prompts(tiny_model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert generate(tiny_model, ids, 4) == generate(tiny_model, ids.tolist(), 4)


def test_seeded_sampling_is_deterministic(tiny_model):
    prompts = [[1, 2, 3], [9, 8]]
    kw = dict(temperature=1.0, top_k=50, top_p=0.9)
    a = generate(tiny_model, prompts, 30, seed=123, **kw)
    assert a == generate(tiny_model, prompts, 30, seed=123, **kw)
    assert a != generate(tiny_model, prompts, 30, seed=124, **kw)


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model):
    greedy = generate(tiny_model, [[5, 6, 7]], 12)
    assert generate(tiny_model, [[5, 6, 7]], 12, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate(tiny_model, [[5, 6, 7]], 12, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_sampler_support_and_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = Counter(sample(logits, 1.0, top_k=2, generator=g).tolist())
    assert set(top2) == {0, 1} and abs(top2[0] / 4000 - 1 / (1 + torch.e**-1)) < 0.03
    # top_p 0.9: softmax mass of the first three tokens is 0.90, so the fourth is dropped.
    top_p = Counter(sample(logits, 1.0, top_p=0.9, generator=g).tolist())
    assert set(top_p) == {0, 1, 2}
    hot = Counter(sample(logits, 100.0, generator=g).tolist())
    assert len(hot) == 6 and min(hot.values()) > 500  # near uniform at high temperature


def test_stop_tokens_and_streaming(tiny_model):
    prompts = [[3, 141, 59, 26, 5], [77, 1]]
    free = generate(tiny_model, prompts, 20)
    stop = free[0][4]
    out = generate(tiny_model, prompts, 20, stop_tokens=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1]
    assert out[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])
    steps = list(generate(tiny_model, prompts, 20, stop_tokens=[stop], stream=True))
    streamed = [[s[b] for s in steps if s[b] is not None] for b in range(2)]
    assert streamed == out
    assert list(generate(tiny_model, prompts, 20, stream=True)) == [list(t) for t in zip(*free)]


def test_stream_leaves_grad_mode_alone(tiny_model):
    it = generate(tiny_model, [[1, 2]], 3, stream=True)
    next(it)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(prompts=[]), "prompts: expected at least one prompt"),
        (dict(prompts=[[1], []]), r"prompts\[1\]: empty"),
        (dict(prompts=[[1, 512]]), r"prompts\[0\]: token id 512 outside"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(mode="turbo"), "mode: expected one of"),
        (dict(mode="cuda-graph"), "mode: cuda-graph needs the model on a CUDA device"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, needle):
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(ModelError, match=needle):
        generate(tiny_model, **args)


def test_sparse_model_generation_cache_matches_no_cache(make_model):
    model = make_model(sparse_ratio=0.3, attention_sparse_ratio=0.5, sparsity_mode="static")
    prompt = list(range(1, 140))
    assert generate(model, [prompt], 6) == [_greedy_without_cache(model, prompt, 6)]


def _decode_logits(model, ids, prefill, steps, cache=None):
    """Prefill ids[:, :prefill] into a KVCache, then one-token steps; logits (steps, vocab) of the steps."""
    cache = cache or KVCache(model.config, 1, prefill + steps)
    out = []
    with torch.no_grad():
        model(ids[:, :prefill], cache=cache)
        for t in range(prefill, prefill + steps):
            pos = torch.tensor([t])
            out.append(model(ids[:, t : t + 1], input_pos=pos, cache=cache)[0, -1])
    return torch.stack(out)


def test_sparse_decode_step_equals_a_forward_without_cache(make_model):
    # The decode step passes the whole cache and the length as a tensor to ds_core. After a
    # prefill of whole blocks, the new token is the only query of its block, so the full forward
    # (a prefill) must select exactly what the decode step selects: 6 visible blocks of 64, 3 kept.
    cfg = dict(attention_sparse_ratio=0.7, max_seq_len=1024)
    model = make_model(**cfg)
    ids = torch.randint(0, model.config.vocab_size, (1, 321), generator=torch.Generator().manual_seed(3))
    step = _decode_logits(model, ids, 320, 1)[0]
    with torch.no_grad():
        full = model(ids)[0, -1]
        dense = make_model(max_seq_len=1024)(ids)[0, -1]  # same weights, every block attended
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    assert (dense - full).abs().max() > 1e-2  # the selection really dropped blocks


def test_sparse_decode_keeps_its_pooled_key_cache_exact(make_model):
    # One layer: its keys depend on the tokens only, so the forward without cache equals the
    # decode step wherever the step's query starts a block (t = 320 and 384). Between them the
    # decode steps complete block 5, whose pooled mean the step at length 384 writes and the
    # step at 385 scores.
    model = make_model(attention_sparse_ratio=0.7, max_seq_len=1024, n_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 385), generator=torch.Generator().manual_seed(4))
    cache = KVCache(model.config, 1, 448)
    steps = _decode_logits(model, ids, 320, 65, cache)
    with torch.no_grad():
        full = model(ids)[0]
    torch.testing.assert_close(steps[0], full[320], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps[64], full[384], rtol=1e-4, atol=1e-4)
    # every complete block's mean is in the cache, the ones the decode steps completed included
    expect = pool_keys(cache.k[0][:, :, :385], cache.block_size)[:, :, :6]
    torch.testing.assert_close(cache.pooled[0][:, :, :6].float(), expect)


def test_sparse_ragged_batch_decodes_like_unbatched_rows(make_model):
    # Left-padded rows: ds_core counts each row's blocks from its first token (kv_start = pad),
    # so a padded row selects as it would alone. Decoding past 5 blocks makes selection drop some.
    model = make_model(attention_sparse_ratio=0.7, max_seq_len=1024)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (100, 170, 37)]
    batched = generate(model, prompts, 200)
    assert batched == [generate(model, [p], 200)[0] for p in prompts]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
def test_gpu_decode_modes_match_eager(make_model, mode):
    model = make_model().cuda()
    prompts = [[3, 141, 59], [26, 5, 35, 89, 79]]
    assert generate(model, prompts, 16, mode=mode) == generate(model, prompts, 16, mode="eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
def test_gpu_dynamic_sparse_decode_modes_match_eager(make_model, mode):
    # ds-core's row-gather kernels inside the captured step (the sparse models' decode path)
    import ds_core

    model = make_model(sparse_ratio=0.5, sparsity_mode="dynamic").cuda()
    with ds_core.calibration(model), torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 48), device="cuda"))
    prompts = [[3, 141, 59], [26, 5, 35, 89, 79]]
    assert generate(model, prompts, 16, mode=mode) == generate(model, prompts, 16, mode="eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
@pytest.mark.parametrize(
    ("ratio", "lengths", "new"),
    [
        (0.7, (300, 190), 200),  # 8 blocks of cache, 3 kept: ds-core's one-launch small-cache kernel
        (0.3, (1400, 1100), 100),  # 24 blocks, up to 17 kept: scores + split attention kernels
    ],
)
def test_gpu_sparse_attention_decode_modes_match_eager(make_model, mode, ratio, lengths, new):
    # Captured / compiled steps run ds_core's device-length sparse attention (no dense fallback)
    # on ragged prompts, decoding far enough that selection drops blocks.
    import warnings

    import ds_core

    model = make_model(
        sparse_ratio=0.5, attention_sparse_ratio=ratio, sparsity_mode="dynamic", max_seq_len=2048
    )
    model = model.cuda()
    with ds_core.calibration(model), torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 48), device="cuda"))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "ds-models: compiling", RuntimeWarning)  # no eager fallback
        got = generate(model, prompts, new, mode=mode)
    assert got == generate(model, prompts, new, mode="eager")
