import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds_models import ModelError, Transformer, load_tokenizer, write_provenance
from ds_models.checkpoint import save_pretrained


def _logits(model, seed=0):
    torch.manual_seed(seed)
    return model(torch.randint(0, model.config.vocab_size, (2, 9)))


def test_round_trip_exact(tiny_model, tmp_path, tokenizer):
    tiny_model.save_pretrained(tmp_path / "m", provenance={"parent": "unit-test"}, tokenizer=tokenizer)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.yaml", "model.safetensors", "provenance.json", "tokenizer.json"]
    loaded = Transformer.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny_model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tie rebuilt, not stored twice
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    torch.testing.assert_close(_logits(loaded), _logits(tiny_model), rtol=0, atol=0)
    prov = json.loads((tmp_path / "m" / "provenance.json").read_text())
    assert prov["parent"] == "unit-test" and "ds-models" in prov["packages"]
    assert load_tokenizer(tmp_path / "m").encode("the fox").ids == tokenizer.encode("the fox").ids
    assert load_tokenizer(tmp_path) is None


def test_dtype_kept_and_overridable(make_model, tmp_path):
    model = make_model(tie_embeddings=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    assert Transformer.from_pretrained(tmp_path / "m").lm_head.weight.dtype == torch.bfloat16
    as32 = Transformer.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert as32.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(as32.lm_head.weight, model.lm_head.weight.float(), rtol=0, atol=0)


def test_sharded_save_and_resave_cleans_old_shards(tiny_model, tmp_path):
    d = tmp_path / "m"
    save_pretrained(tiny_model, d, max_shard_bytes=100_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((d / s).exists() for s in shards)
    assert not (d / "model.safetensors").exists()
    torch.testing.assert_close(_logits(Transformer.from_pretrained(d)), _logits(tiny_model), rtol=0, atol=0)
    (d / "notes.txt").write_text("kept")  # somebody else's file in the directory survives a re-save
    tiny_model.save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "notes.txt",
        "provenance.json",
    ]
    assert not list(tmp_path.glob(".m.tmp-*"))  # no temp directory left behind


def test_failed_save_leaves_existing_directory_untouched(tiny_model, make_model, tmp_path):
    d = tmp_path / "m"
    tiny_model.save_pretrained(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(FileNotFoundError):
        make_model(seed=5).save_pretrained(d, tokenizer=tmp_path / "no-such-tokenizer.json")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_registry_name_builds_random_model():
    model = Transformer.from_pretrained("ds-tiny", dtype=torch.bfloat16)
    assert model.config.d_model == 64 and model.embed_tokens.weight.dtype == torch.bfloat16


def test_sparse_state_is_saved_and_absent_state_is_derived(make_model, tmp_path):
    model = make_model(sparse_ratio=0.5, sparsity_mode="static")
    with torch.no_grad():
        model.layers[0].mlp.neuron_score.copy_(torch.linspace(-1, 1, 160))
    model.save_pretrained(tmp_path / "m")
    loaded = Transformer.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.layers[0].mlp.neuron_score, model.layers[0].mlp.neuron_score)
    torch.testing.assert_close(_logits(loaded), _logits(model))
    # A checkpoint without the scores (like an imported HF one) loads; scores come from the weights.
    path = tmp_path / "m" / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if "neuron_score" not in k}
    save_file(tensors, path)
    again = Transformer.from_pretrained(tmp_path / "m")
    assert torch.isfinite(again.layers[0].mlp.neuron_score).all()
    assert not torch.equal(again.layers[0].mlp.neuron_score, model.layers[0].mlp.neuron_score)


# ---- clear errors ---------------------------------------------------------------------------------


@pytest.fixture
def saved(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_directory_config_and_weights(saved, tmp_path):
    with pytest.raises(ModelError, match="no such model directory or registry name"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no model.safetensors or model.safetensors.index.json"):
        Transformer.from_pretrained(saved)
    (saved / "config.yaml").unlink()
    with pytest.raises(ModelError, match=r"config.yaml: missing"):
        Transformer.from_pretrained(saved)


def test_corrupt_weight_file_names_the_file(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])  # truncated download
    with pytest.raises(ModelError) as e:
        Transformer.from_pretrained(saved)
    assert str(path) in str(e.value) and "corrupt" in str(e.value)
    path.write_bytes(b"\x80\x04 not safetensors, maybe a pickle")
    with pytest.raises(ModelError, match=r"model\.safetensors: corrupt"):
        Transformer.from_pretrained(saved)


def test_missing_tensor_is_named(saved):
    path = saved / "model.safetensors"
    tensors = load_file(path)
    del tensors["layers.1.self_attn.v_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ModelError, match=r"layers.1.self_attn.v_proj.weight: missing"):
        Transformer.from_pretrained(saved)


def test_shape_mismatch_names_file_and_tensor(saved):
    text = (saved / "config.yaml").read_text().replace("d_ff: 160", "d_ff: 192")
    (saved / "config.yaml").write_text(text)
    with pytest.raises(ModelError) as e:
        Transformer.from_pretrained(saved)
    msg = str(e.value)
    assert "model.safetensors: layers.0.mlp." in msg and "160" in msg and "192" in msg


def test_unexpected_tensor_is_named(saved):
    path = saved / "model.safetensors"
    tensors = load_file(path)
    tensors["layers.0.self_attn.rotary.inv_freq"] = torch.ones(8)
    save_file(tensors, path)
    with pytest.raises(ModelError, match=r"layers.0.self_attn.rotary.inv_freq: unexpected tensor"):
        Transformer.from_pretrained(saved)


def test_index_pointing_at_missing_shard(tiny_model, tmp_path):
    d = tmp_path / "m"
    save_pretrained(tiny_model, d, max_shard_bytes=100_000)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError, match=f"{shard.name}: missing"):
        Transformer.from_pretrained(d)


def test_write_provenance_merges(tmp_path):
    write_provenance(tmp_path, data="corpus-a")
    write_provenance(tmp_path, command="ds-train x")
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["data"] == "corpus-a" and prov["command"] == "ds-train x" and "torch" in prov["packages"]
