"""Logits parity with HF transformers (the reference) for Llama and Qwen2 checkpoints imported by name."""

import json

import pytest
import torch

from ds_models import ModelError, Transformer, generate
from ds_models.cli import main
from ds_models.hf_import import config_from_hf, import_hf

transformers = pytest.importorskip("transformers")


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "kind, tied, shard",
    [("llama", False, False), ("llama", False, True), ("qwen2", False, False), ("qwen2", True, True)],
)
def test_import_hf_logits_parity(make_hf_checkpoint, tmp_path, kind, tied, shard):
    hf, src = make_hf_checkpoint(kind, tied=tied, shard=shard)
    dst = tmp_path / "ds"
    assert main(["import-hf", str(src), str(dst)]) == 0
    model = Transformer.from_pretrained(dst)
    c = model.config
    assert (c.qkv_bias, c.tie_embeddings, c.n_kv_heads) == (kind == "qwen2", tied, 2)
    assert c.rope_theta == (500000.0 if kind == "llama" else 1000000.0)
    torch.manual_seed(0)
    ids = torch.randint(0, 160, (2, 33))
    with torch.no_grad():
        ours = model(ids)
        ref = hf(ids).logits.float()
    assert _rel_err(ours, ref) <= 1e-4
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_greedy_generation_matches_hf_generate(make_hf_checkpoint, tmp_path):
    hf, src = make_hf_checkpoint("qwen2")
    import_hf(src, tmp_path / "ds")
    model = Transformer.from_pretrained(tmp_path / "ds")
    prompt = [5, 17, 99, 3, 42, 8]
    ours = generate(model, [prompt], 12)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours == ref[0, len(prompt) :].tolist()


def test_import_copies_tokenizer_and_can_cast(make_hf_checkpoint, tokenizer, tmp_path):
    _, src = make_hf_checkpoint("llama")
    tokenizer.save(str(src / "tokenizer.json"))
    import_hf(src, tmp_path / "ds", dtype=torch.bfloat16)
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    model = Transformer.from_pretrained(tmp_path / "ds")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    prov = json.loads((tmp_path / "ds" / "provenance.json").read_text())
    assert prov["imported_from"]["architecture"] == "LlamaForCausalLM"


def test_import_errors_name_file_and_field(make_hf_checkpoint, tmp_path, capsys):
    _, src = make_hf_checkpoint("llama", shard=True)
    cfg = json.loads((src / "config.json").read_text())

    bad = dict(cfg, model_type="gpt2")
    (src / "config.json").write_text(json.dumps(bad))
    capsys.readouterr()  # drop HF's own progress output from building the fixture
    assert main(["import-hf", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json: model_type: 'gpt2' is not supported" in err
    assert not (tmp_path / "out").exists()

    (src / "config.json").write_text(json.dumps(dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ModelError, match="rope_scaling"):
        import_hf(src, tmp_path / "out")

    (src / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    with pytest.raises(
        ModelError, match=r"model-0000\d-of-0000\d.safetensors: model.layers.0.mlp.\w+_proj.weight: shape"
    ):
        import_hf(src, tmp_path / "out")

    (src / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(ModelError, match=r"model.layers.2.\S+: missing"):
        import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))

    (src / "config.json").unlink()
    with pytest.raises(ModelError, match=r"config\.json: missing"):
        import_hf(src, tmp_path / "out")


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2,
    )))  # fmt: skip
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match=r"pickle \.bin files are never read"):
        import_hf(tmp_path, tmp_path / "out")


def test_config_from_hf_reads_old_style_rope_theta():
    c = config_from_hf(
        dict(
            model_type="llama",
            vocab_size=102400,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=30,
            num_attention_heads=32,
            num_key_value_heads=32,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            rope_scaling=None,
        )
    )  # fmt: skip  (deepseek-llm-7b-base's config.json, abridged)
    from ds_models import ModelConfig

    assert c == ModelConfig.from_name("ds-7b")
