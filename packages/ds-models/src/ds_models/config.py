"""Model configuration: one dataclass, a named registry, and config.yaml reading / writing.

Each registry entry mirrors the shape of a public checkpoint (noted next to it), so that
`ds-models import-hf` of that checkpoint produces the same `ModelConfig` up to the fields
the note calls out. Sizes that follow from others (head_dim) are derived, never repeated.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ModelError(ValueError):
    """Bad model input: a config field, a config file, a checkpoint file or a tensor in it.

    The message names the file and/or field and says what was expected.
    """


SPARSITY_MODES = ("static", "dynamic")
SPARSE_PROJECTIONS = ("mlp", "all")


@dataclass
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 256
    # Fraction of MLP neurons / attention key blocks skipped per token (ds_core.SparsityConfig).
    sparse_ratio: float = 0.0
    attention_sparse_ratio: float = 0.0
    sparsity_mode: str = "dynamic"
    # Which projections sparse_ratio sparsifies: "mlp" (gate/up/down, ds_core.SparseMLP) or "all"
    # (also the attention's q/k/v/o, as ds_core.DynamicSparseLinear: TEAL's setting).
    sparse_projections: str = "mlp"
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ModelError(f"{name}: expected a positive number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ModelError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("sparse_ratio", "attention_sparse_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ModelError(f"{name}: expected a number in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        if self.sparsity_mode not in SPARSITY_MODES:
            raise ModelError(
                f"sparsity_mode: expected one of {', '.join(SPARSITY_MODES)}, got {self.sparsity_mode!r}"
            )
        if self.sparse_projections not in SPARSE_PROJECTIONS:
            raise ModelError(
                f"sparse_projections: expected one of {', '.join(SPARSE_PROJECTIONS)}, "
                f"got {self.sparse_projections!r}"
            )
        if self.d_model % self.n_heads:
            raise ModelError(f"n_heads: {self.n_heads} does not divide d_model {self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ModelError(f"n_heads: head_dim d_model/n_heads = {self.head_dim} must be even for RoPE")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A registry entry (see `REGISTRY`), optionally with some fields overridden."""
        if name not in REGISTRY:
            raise ModelError(f"model name {name!r}: unknown; expected one of {', '.join(REGISTRY)}")
        return cls.from_dict({**REGISTRY[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ModelError(f"config: expected a mapping of field: value, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ModelError(f"{unknown[0]}: unknown field; expected some of {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ModelConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: cannot read: {e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise ModelError(f"{path}: {where}invalid YAML") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ModelError as e:
            raise ModelError(f"{path}: {e}") from None
        except TypeError as e:  # e.g. a field given twice through odd YAML
            raise ModelError(f"{path}: {e}") from None

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temp file in the same directory, then os.replace."""
        path = Path(path)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


# ---- registry ---------------------------------------------------------------------------------
# Parameter counts (meta device, tied weights counted once) are checked against the names in the
# tests: within 3%.
REGISTRY: dict[str, dict[str, Any]] = {
    # Unit tests: a few hundred thousand parameters, runs in milliseconds on CPU.
    "ds-tiny": dict(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160,
        rope_theta=10000.0, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True, max_seq_len=256,
    ),
    # ~12M parameters: trains on a laptop CPU in minutes (quickstart, examples).
    "ds-small": dict(
        vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024,
        rope_theta=10000.0, norm_eps=1e-6, qkv_bias=False, tie_embeddings=True, max_seq_len=1024,
    ),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (Qwen2ForCausalLM): same shape, qkv bias, rope 1e4,
    # eps 1e-6, context 131072. One difference: that checkpoint unties lm_head from embed_tokens
    # (tie_word_embeddings: false, 1.78B parameters); ds-1.5b ties them as its base Qwen2.5-Math-1.5B
    # does, which keeps the family at its 1.5B name. `import-hf` of the public checkpoint reads
    # tie_word_embeddings from its config.json and keeps the separate head.
    "ds-1.5b": dict(
        vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, d_ff=8960,
        rope_theta=10000.0, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True, max_seq_len=131072,
    ),
    # deepseek-ai/deepseek-llm-7b-base (LlamaForCausalLM): multi-head attention (32 kv heads).
    "ds-7b": dict(
        vocab_size=102400, d_model=4096, n_layers=30, n_heads=32, n_kv_heads=32, d_ff=11008,
        rope_theta=10000.0, norm_eps=1e-6, qkv_bias=False, tie_embeddings=False, max_seq_len=4096,
    ),
    # deepseek-ai/deepseek-llm-67b-base (LlamaForCausalLM): grouped-query attention, 8 kv heads.
    "ds-67b": dict(
        vocab_size=102400, d_model=8192, n_layers=95, n_heads=64, n_kv_heads=8, d_ff=22016,
        rope_theta=10000.0, norm_eps=1e-6, qkv_bias=False, tie_embeddings=False, max_seq_len=4096,
    ),
}  # fmt: skip
