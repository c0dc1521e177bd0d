from collections import Counter

import pytest
import torch

from ds_models import ModelError, generate
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
