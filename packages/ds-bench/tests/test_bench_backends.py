"""The backends agree with each other on the same weights: logits, greedy tokens, and the step clock."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ds_bench.backends import make_backend
from ds_bench.errors import BenchError
from ds_models import ModelConfig, Transformer

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 64], [300, 2, 2, 81, 19, 44, 150, 9]]
needs_quant = pytest.mark.skipif(
    importlib.util.find_spec("ds_quant") is None, reason="ds-quant not installed"
)


def run(backend, prompts=PROMPTS, n=6):
    steps = []
    backend.generate(prompts, n, lambda i, tok, t: steps.append((i, list(tok), t)))
    return steps


@pytest.fixture(scope="module")
def torch_backend(varied_dir):
    b = make_backend("torch")
    b.load(varied_dir)
    return b


def test_hf_baseline_matches_ds_logits_and_tokens(torch_backend, varied_dir):
    hf = make_backend("hf")
    hf.load(varied_dir)
    assert type(hf.model).__name__ == "Qwen2ForCausalLM"  # ds-tiny has q/k/v biases
    ids = PROMPTS[0] + PROMPTS[1]
    np.testing.assert_allclose(hf.logits(ids), torch_backend.logits(ids), atol=1e-4, rtol=1e-4)
    ours, theirs = run(torch_backend), run(hf)
    assert [s[1] for s in theirs] == [s[1] for s in ours]
    assert len({tuple(s[1]) for s in ours}) > 1  # varied tokens: the comparison means something


def test_hf_baseline_as_llama_when_there_are_no_qkv_biases(tmp_path):
    torch.manual_seed(3)
    Transformer(ModelConfig.from_name("ds-tiny", qkv_bias=False)).save_pretrained(tmp_path / "m")
    hf, ds = make_backend("hf"), make_backend("torch")
    hf.load(tmp_path / "m")
    ds.load(tmp_path / "m")
    assert type(hf.model).__name__ == "LlamaForCausalLM"
    np.testing.assert_allclose(hf.logits(PROMPTS[0]), ds.logits(PROMPTS[0]), atol=1e-4, rtol=1e-4)


def test_step_clock_one_call_per_token_in_order(torch_backend):
    steps = run(torch_backend, n=5)
    assert [s[0] for s in steps] == [0, 1, 2, 3, 4]
    assert all(len(s[1]) == len(PROMPTS) for s in steps)
    times = [s[2] for s in steps]
    assert times == sorted(times) and times[-1] > times[0]


def test_fast_path_gives_the_eager_tokens(torch_backend, varied_dir):
    fast = make_backend("torch-fast")
    fast.load(varied_dir)
    assert fast.describe()["decode_mode"] == ("compile" if torch.cuda.is_available() else "eager")
    assert [s[1] for s in run(fast)] == [s[1] for s in run(torch_backend)]


@needs_quant
def test_onnx_backend_matches_torch(torch_backend, onnx_dir):
    onnx = make_backend("onnx", threads=1)
    onnx.load(onnx_dir)
    assert onnx.describe()["threads"] == 1 and onnx.describe()["providers"] == ["CPUExecutionProvider"]
    np.testing.assert_allclose(
        onnx.logits(PROMPTS[0]), torch_backend.logits(PROMPTS[0]), atol=1e-4, rtol=1e-4
    )
    assert [s[1] for s in run(onnx)] == [s[1] for s in run(torch_backend)]
    assert onnx.facts.quant is None and onnx.facts.vocab_size == 512


@needs_quant
def test_quantized_model_in_torch_and_onnx(varied_dir, tmp_path):
    from ds_quant.checkpoint import save_quantized
    from ds_quant.onnx_export import export_directory
    from ds_quant.quantize import quantize

    model = Transformer.from_pretrained(varied_dir)
    save_quantized(quantize(model, bits=4, group_size=32), tmp_path / "int4")
    export_directory(tmp_path / "int4", tmp_path / "int4-onnx")
    t, o, f = make_backend("torch"), make_backend("onnx"), make_backend("torch")
    t.load(tmp_path / "int4")
    o.load(tmp_path / "int4-onnx")
    f.load(varied_dir)
    assert t.facts.quant == "int4" and o.facts.quant == "int4"
    assert t.facts.matmul_weight_bytes < f.facts.matmul_weight_bytes / 4  # packed 4-bit + scales
    # Same packed weights, but ds-quant exports MatMulNBits at accuracy_level 4 (int8 activations on
    # CPU, by design), which these wide random weights amplify: compare relative error and top-1.
    lo, lt = o.logits(PROMPTS[0]), t.logits(PROMPTS[0])
    assert np.linalg.norm(lo - lt) / np.linalg.norm(lt) < 0.05
    assert (lo.argmax(-1) == lt.argmax(-1)).mean() >= 0.75
    with pytest.raises(BenchError, match=r"quant\.yaml"):
        make_backend("hf").load(tmp_path / "int4")


def test_bad_input_raises_bench_error(tmp_path, varied_dir):
    with pytest.raises(BenchError, match="--backend: unknown 'tensorrt'"):
        make_backend("tensorrt")
    with pytest.raises(BenchError, match="--dtype"):
        make_backend("torch", dtype="fp8")
    with pytest.raises(BenchError, match="--threads: expected a positive integer, got 0"):
        make_backend("torch", threads=0)
    with pytest.raises(BenchError, match=r"no model\.onnx"):
        make_backend("onnx").load(varied_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("d_model: -3\n")
    with pytest.raises(BenchError, match=r"bad.*cannot load.*d_model"):
        make_backend("torch").load(bad)


def test_hf_refuses_a_sparse_model(tmp_path):
    Transformer(ModelConfig.from_name("ds-tiny", sparse_ratio=0.5)).save_pretrained(tmp_path / "sparse")
    with pytest.raises(BenchError, match="sparse"):
        make_backend("hf").load(tmp_path / "sparse")


@pytest.mark.parametrize(("d_ff", "mode"), [(1536, "static"), (1536, "dynamic"), (200, "static")])
def test_matmul_params_count_the_weights_a_token_is_multiplied_by(d_ff, mode):
    """MFU's FLOPs: a static-sparse MLP multiplies only its kept neurons (what ds-core computes and
    exporters gather); a dense or dynamic model counts every projection and the lm_head."""
    from ds_bench.backends import matmul_params

    cfg = ModelConfig.from_name("ds-tiny", d_ff=d_ff, sparse_ratio=0.3, sparsity_mode=mode)
    model = Transformer(cfg)
    expected = model.lm_head.weight.numel()
    for layer in model.layers:
        attn = layer.self_attn
        expected += sum(getattr(attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        width = layer.mlp.static_keep_indices().numel() if mode == "static" else d_ff
        expected += 3 * cfg.d_model * width
    assert matmul_params(cfg) == expected
    if mode == "static":
        assert matmul_params(cfg) < matmul_params(ModelConfig.from_name("ds-tiny", d_ff=d_ff))
