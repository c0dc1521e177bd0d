"""sparse_projections="all": the attention's q/k/v/o skip small input activations too (TEAL)."""

import pytest
import torch
from torch import nn

from ds_core import DynamicSparseLinear, calibration
from ds_models import KVCache, ModelConfig, ModelError, Transformer, generate


def _calibrated(make_model, **overrides) -> Transformer:
    cfg = dict(sparse_ratio=0.5, sparsity_mode="dynamic", sparse_projections="all", max_seq_len=512)
    model = make_model(**{**cfg, **overrides})
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with calibration(model), torch.no_grad():
        model(ids)
    return model


def test_config_names_the_field():
    with pytest.raises(ModelError, match="sparse_projections: expected one of mlp, all, got 'qkv'"):
        ModelConfig.from_name("ds-tiny", sparse_projections="qkv")
    cfg = ModelConfig.from_name("ds-tiny", sparse_projections="all")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_only_all_with_a_ratio_makes_the_projections_sparse(make_model):
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    attn = make_model(sparse_ratio=0.5, sparse_projections="all").layers[0].self_attn
    assert all(type(getattr(attn, n)) is DynamicSparseLinear for n in names)
    for overrides in (dict(sparse_ratio=0.5), dict(sparse_projections="all")):  # "mlp" / ratio 0
        attn = make_model(**overrides).layers[0].self_attn
        assert all(type(getattr(attn, n)) is nn.Linear for n in names)


def test_calibration_sets_one_threshold_for_q_k_v(make_model):
    model = _calibrated(make_model)
    for layer in model.layers:
        a = layer.self_attn
        t = [float(m.act_threshold) for m in (a.q_proj, a.k_proj, a.v_proj)]
        assert t[0] > 0 and t == [t[0]] * 3  # one input, one threshold
        assert float(a.o_proj.act_threshold) > 0


def test_decode_with_cache_equals_forward_without_cache(make_model):
    # The cached steps run q/k/v as one row-gather product over the fused transposed weights;
    # the cache-free forward runs each DynamicSparseLinear on its own: same activations skipped.
    model = _calibrated(make_model)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 1, 64)
    with torch.no_grad():
        steps = [model(ids[:, :30], cache=cache)[0, -1]]
        for t in range(30, 40):
            steps.append(model(ids[:, t : t + 1], input_pos=torch.tensor([t]), cache=cache)[0, -1])
        full = model(ids)[0, 29:]
        mlp_only = make_model(sparse_ratio=0.5, sparse_projections="mlp", max_seq_len=512)
        mlp_only.load_state_dict(model.state_dict(), strict=False)
        other = mlp_only(ids)[0, 29:]
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-4)
    assert (other - full).abs().max() > 1e-3  # the projections really skipped activations


def test_generate_cache_matches_no_cache(make_model):
    model = _calibrated(make_model)
    prompts = [[3, 141, 59, 26, 5], [35, 89, 79]]
    got = generate(model, prompts, 12)
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt) :]


def test_checkpoint_round_trip_and_plain_state_dicts(make_model, tmp_path):
    model = _calibrated(make_model)
    model.save_pretrained(tmp_path / "m")
    loaded = Transformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.sparse_projections == "all"
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    # a checkpoint without sparse state (HF import, a dense model) loads strictly: thresholds uncalibrated
    dense = make_model(max_seq_len=512)
    fresh = make_model(sparse_ratio=0.5, sparse_projections="all", max_seq_len=512)
    fresh.load_state_dict(dense.state_dict())
    assert not fresh.layers[0].self_attn.q_proj.calibrated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
def test_gpu_sparse_projection_decode_modes_match_eager(make_model, mode):
    model = _calibrated(make_model).cuda()
    prompts = [[3, 141, 59], [26, 5, 35, 89, 79]]
    assert generate(model, prompts, 16, mode=mode) == generate(model, prompts, 16, mode="eager")
    one = [[3, 141, 59, 26]]  # batch 1: the row-gather kernels (2 rows may take the dense fallback)
    assert generate(model, one, 16, mode=mode) == generate(model, one, 16, mode="eager")
