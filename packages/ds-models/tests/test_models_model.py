import pytest
import torch

from ds_core import SparseMLP
from ds_models import KVCache, ModelError, Transformer


def test_module_names_follow_hf_layout(tiny_model):
    names = dict(tiny_model.named_modules())
    for name in [
        "embed_tokens", "layers.0.input_layernorm", "layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
        "layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj", "layers.0.post_attention_layernorm",
        "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj", "norm", "lm_head",
    ]:  # fmt: skip
        assert name in names, name
    assert isinstance(names["layers.0.mlp"], SparseMLP)
    assert isinstance(names["layers.0.self_attn.q_proj"], torch.nn.Linear)
    assert tiny_model.lm_head.weight is tiny_model.embed_tokens.weight  # ds-tiny ties them


def test_forward_shapes_and_float_logits(make_model):
    model = make_model().to(torch.bfloat16)
    logits = model(torch.randint(0, 512, (3, 7)))
    assert logits.shape == (3, 7, 512) and logits.dtype == torch.float32


def test_causal(tiny_model):
    ids = torch.randint(0, 512, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 512
    torch.testing.assert_close(tiny_model(ids)[:, :8], tiny_model(changed)[:, :8])
    assert not torch.allclose(tiny_model(ids)[:, 8:], tiny_model(changed)[:, 8:])


def test_cache_prefill_then_decode_equals_full_forward(tiny_model):
    ids = torch.randint(0, 512, (2, 11))
    full = tiny_model(ids)
    cache = KVCache(tiny_model.config, 2, 16)
    parts = [tiny_model(ids[:, :5], cache=cache)]
    for t in range(5, 11):
        parts.append(tiny_model(ids[:, t : t + 1], input_pos=torch.tensor([t]), cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_left_padding_mask_matches_unpadded_rows(tiny_model):
    a = torch.randint(1, 512, (1, 9))
    b = torch.randint(1, 512, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    out = tiny_model(batch, attention_mask=mask)
    torch.testing.assert_close(out[0], tiny_model(a)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, 4:], tiny_model(b)[0], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out).all()  # padded query rows are not NaN
    with pytest.raises(ModelError, match="padding must be on the left"):
        tiny_model(batch, cache=KVCache(tiny_model.config, 2, 16), attention_mask=mask.flip(1))


def test_gradient_checkpointing_gives_the_same_gradients(make_model):
    ids = torch.randint(0, 512, (2, 10))
    grads = []
    for enabled in (False, True):
        model = make_model(seed=3).train()
        model.set_gradient_checkpointing(enabled)
        assert model.gradient_checkpointing is enabled
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_sparse_models_run_and_cache_matches_full(make_model, mode):
    # Longer than one 64-token attention block so the sparse selection really drops blocks.
    model = make_model(sparse_ratio=0.3, attention_sparse_ratio=0.5, sparsity_mode=mode)
    ids = torch.randint(0, 512, (1, 200))
    with torch.no_grad():
        full = model(ids)
        dense = make_model(sparsity_mode=mode)  # same seed, same weights, ratio 0
        assert not torch.allclose(full, dense(ids), atol=1e-3)  # sparsity changes the output
        cache = KVCache(model.config, 1, 256)
        parts = [model(ids[:, :150], cache=cache)]
        for t in range(150, 200):
            parts.append(model(ids[:, t : t + 1], input_pos=torch.tensor([t]), cache=cache))
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_sparse_ratio_zero_is_dense_swiglu(tiny_model):
    mlp = tiny_model.layers[0].mlp
    x = torch.randn(3, 64)
    expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)


def test_input_pos_without_cache_is_rejected(tiny_model):
    with pytest.raises(ModelError, match="input_pos"):
        tiny_model(torch.zeros(1, 3, dtype=torch.long), input_pos=torch.arange(3))


def test_untied_head_is_separate(make_model):
    model = make_model(tie_embeddings=False)
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert isinstance(model, Transformer)


def test_fused_qkv_decode_path_matches_and_keeps_state_dict(make_model, tmp_path):
    model = make_model()
    ids = torch.randint(0, 512, (2, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.layers:
        layer.self_attn.fuse_qkv()
        assert layer.self_attn.qkv_intact()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    outs = []
    for fixed in (False, True):  # the fused buffer is read only when cache.fixed_shapes is set
        cache = KVCache(model.config, 2, 16)
        cache.fixed_shapes = fixed
        outs.append(model(ids, cache=cache))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "m")  # views into the fused buffer are saved as their own tensors
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path / "m")(ids), model(ids))
    model.to(torch.float64)  # replaces the weights: the fused buffer no longer backs them
    assert not model.layers[0].self_attn.qkv_intact()
    model.layers[0].self_attn.fuse_qkv()
    assert model.layers[0].self_attn.qkv_intact() and model.layers[0].self_attn.qkv[0].dtype == torch.float64
