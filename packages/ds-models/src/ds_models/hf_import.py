"""Import Hugging Face Llama / Qwen2 checkpoints (config.json + safetensors) into a ds model directory.

The public DeepSeek checkpoints that the registry mirrors use these two architectures
(deepseek-llm-7b/67b: LlamaForCausalLM; DeepSeek-R1-Distill-Qwen-1.5B: Qwen2ForCausalLM). ds
module names are HF's minus the "model." prefix, so the mapping is by name; the RoPE layout is
the same "rotate half" one, so no tensor is permuted. Tensors stream shard by shard: importing a
67B checkpoint holds one output shard in memory, not the model. Nothing is downloaded and no
pickle (.bin) file is read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ds_models.checkpoint import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    TOKENIZER_FILE,
    atomic_directory,
    iter_safetensors,
    write_provenance,
    write_safetensors,
)
from ds_models.config import ModelConfig, ModelError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a HF config.json dict; refuses what the ds decoder does not compute."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(
            f"{where}: model_type: {model_type!r} is not supported; expected one of {', '.join(ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if key not in hf:
            raise ModelError(f"{where}: {key}: missing")
        return hf[key]

    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act: {hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise ModelError(f"{where}: mlp_bias: true is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ModelError(f"{where}: attention_bias: true is not supported for llama (it also biases o_proj)")
    if hf.get("use_sliding_window"):
        raise ModelError(f"{where}: use_sliding_window: true is not supported")
    # transformers >= 5 writes rope_parameters; older configs (the DeepSeek ones) rope_theta/rope_scaling.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ModelError(
            f"{where}: rope_scaling: {scaling or rope_type!r} is not supported (plain RoPE only)"
        )
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))

    d_model, n_heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != d_model // n_heads:
        raise ModelError(
            f"{where}: head_dim: {head_dim} differs from hidden_size / num_attention_heads, unsupported"
        )
    try:
        return ModelConfig(
            vocab_size=need("vocab_size"),
            d_model=d_model,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_ff=need("intermediate_size"),
            rope_theta=float(rope_theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        )
    except ModelError as e:
        raise ModelError(f"{where}: {e}") from None


def hf_to_ds_name(name: str) -> str | None:
    """HF weight name -> ds name; None for tensors that ds does not store (rotary tables)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name.startswith("model."):
        return name[len("model.") :]
    return name  # lm_head.weight


def ds_to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def import_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> ModelConfig:
    """Write the ds model directory `dst` for the HF checkpoint directory `src`; return its config."""
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not src.is_dir():
        raise ModelError(f"{src}: not a directory")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{config_path}: missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{config_path}: not valid JSON ({e})") from None
    config = config_from_hf(hf, str(config_path))
    if not (src / "model.safetensors").exists() and not (src / "model.safetensors.index.json").exists():
        found = "pytorch_model.bin" if any(src.glob("pytorch_model*.bin")) else "none"
        raise ModelError(
            f"{src}: no model.safetensors or model.safetensors.index.json (pickle .bin files are never read; found: {found})"
        )

    expected = _expected_shapes(config)
    seen: set[str] = set()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        items = iter_safetensors(src)
        if progress:
            from tqdm import tqdm

            items = tqdm(items, total=len(expected), desc="import-hf", unit="tensor")
        for file, hf_name, t in items:
            name = hf_to_ds_name(hf_name)
            if name is None:
                continue
            if config.tie_embeddings and name == "lm_head.weight":
                continue  # a tied head some exporters write anyway; ds rebuilds it from the embedding
            if name not in expected:
                raise ModelError(f"{src / file}: {hf_name}: not a {hf['model_type']} weight ds knows")
            if tuple(t.shape) != expected[name]:
                raise ModelError(
                    f"{src / file}: {hf_name}: shape {tuple(t.shape)}, config.json implies {expected[name]}"
                )
            seen.add(name)
            yield name, (t.to(dtype) if dtype is not None else t)

    with atomic_directory(dst) as tmp:
        config.to_yaml(tmp / CONFIG_FILE)
        write_safetensors(tensors(), tmp, max_shard_bytes=max_shard_bytes)
        missing = sorted(set(expected) - seen)
        if missing:
            raise ModelError(
                f"{src}: {ds_to_hf_name(missing[0])}: missing from the safetensors files ({len(missing)} missing)"
            )
        if (src / TOKENIZER_FILE).exists():
            shutil.copyfile(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        write_provenance(
            tmp,
            parent=str(src.resolve()),
            imported_from={"format": "huggingface", "architecture": ARCHITECTURES[hf["model_type"]]},
        )
    return config


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    from ds_models.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")
    for mname, module in model.named_modules():  # ds_core sparse state: not in HF checkpoints
        keys = getattr(module, "sparse_state_keys", None)
        if callable(keys):
            for k in keys():
                shapes.pop(f"{mname}.{k}", None)
    return shapes


def export_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under HF Llama/Qwen2 names (for parity tests and HF baselines)."""
    out = {}
    skip = set()
    for mname, module in model.named_modules():
        keys = getattr(module, "sparse_state_keys", None)
        if callable(keys):
            skip.update(f"{mname}.{k}" for k in keys())
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        out[ds_to_hf_name(name)] = t
    return out


def hf_config_dict(config: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The HF config.json fields for a ds config (the inverse of config_from_hf)."""
    model_type = model_type or ("qwen2" if config.qkv_bias else "llama")
    if config.qkv_bias != (model_type == "qwen2"):
        raise ModelError(f"qkv_bias: {config.qkv_bias} cannot be expressed as a {model_type} checkpoint")
    return dict(
        model_type=model_type,
        architectures=[ARCHITECTURES[model_type]],
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
    )
