import pytest
import yaml

from ds_models import REGISTRY, ModelConfig, ModelError
from ds_models.footprint import count_parameters, footprint_rows


@pytest.mark.parametrize("name, billions", [("ds-1.5b", 1.5), ("ds-7b", 7.0), ("ds-67b", 67.0)])
def test_registry_parameter_counts_match_names(name, billions):
    n = count_parameters(ModelConfig.from_name(name))
    assert abs(n / (billions * 1e9) - 1) <= 0.03, f"{name}: {n:,} parameters"


def test_registry_shapes_mirror_public_checkpoints():
    c = ModelConfig.from_name("ds-1.5b")  # DeepSeek-R1-Distill-Qwen-1.5B
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff) == (
        151936,
        1536,
        28,
        12,
        2,
        8960,
    )
    assert c.qkv_bias and c.head_dim == 128
    c = ModelConfig.from_name("ds-7b")  # deepseek-llm-7b-base
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff) == (
        102400,
        4096,
        30,
        32,
        32,
        11008,
    )
    c = ModelConfig.from_name("ds-67b")  # deepseek-llm-67b-base
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff) == (
        102400,
        8192,
        95,
        64,
        8,
        22016,
    )
    small = count_parameters(ModelConfig.from_name("ds-small"))
    assert 5e6 < small < 25e6
    assert set(REGISTRY) == {"ds-tiny", "ds-small", "ds-1.5b", "ds-7b", "ds-67b"}


def test_footprint_rows_scale_with_precision():
    c = ModelConfig.from_name("ds-7b")
    rows = {r["precision"]: r for r in footprint_rows(c, seq_len=4096)}
    n = count_parameters(c)
    assert rows["bf16"]["weights"] == 2 * n and rows["int4"]["weights"] == n / 2
    # K and V, every layer, every kv head: 2 * 30 * 32 * 128 values per token.
    assert rows["bf16"]["kv_per_token"] == 2 * 30 * 32 * 128 * 2
    assert rows["fp32"]["kv_cache"] == rows["fp32"]["kv_per_token"] * 4096


def test_yaml_round_trip(tmp_path):
    c = ModelConfig.from_name(
        "ds-small", sparse_ratio=0.3, attention_sparse_ratio=0.25, sparsity_mode="static"
    )
    c.to_yaml(tmp_path / "config.yaml")
    back = ModelConfig.from_yaml(tmp_path / "config.yaml")
    assert back == c
    assert "head_dim" not in yaml.safe_load((tmp_path / "config.yaml").read_text())  # derived, not stored
    assert back.head_dim == 64


@pytest.mark.parametrize(
    "content, needle",
    [
        ("d_model: 64\nn_heeds: 4\n", "n_heeds: unknown field"),
        ("d_model: sixty-four\n", "d_model: expected a positive integer"),
        ("sparse_ratio: 1.5\n", "sparse_ratio: expected a number in [0, 1)"),
        ("sparsity_mode: sometimes\n", "sparsity_mode: expected one of static, dynamic"),
        ("qkv_bias: maybe\n", "qkv_bias: expected true or false"),
        ("n_heads: 3\n", "n_heads: 3 does not divide d_model 64"),
        ("d_model: [1,\n", "line 2: invalid YAML"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_yaml_errors_name_file_and_field(tmp_path, content, needle):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ModelError) as e:
        ModelConfig.from_yaml(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_yaml_and_unknown_name(tmp_path):
    with pytest.raises(ModelError, match="file not found"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ModelError, match=r"ds-huge.*unknown"):
        ModelConfig.from_name("ds-huge")


def test_dict_round_trip_and_overrides():
    c = ModelConfig.from_name("ds-tiny", vocab_size=1000)
    assert c.vocab_size == 1000 and ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ModelError, match="n_kv_heads: 3 does not divide n_heads 4"):
        ModelConfig.from_name("ds-tiny", n_kv_heads=3)
