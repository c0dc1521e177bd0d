"""Sparsity knobs shared by the sparse MLP and sparse attention, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MODES = ("static", "dynamic")


class DsCoreError(ValueError):
    """Bad input to a ds_core function or module: the message names the argument and what was expected."""


class SparsityConfigError(DsCoreError):
    """A SparsityConfig field is out of range; the message names the field."""


@dataclass
class SparsityConfig:
    """How much of the MLP and the attention to skip.

    ``sparse_ratio`` is the fraction of MLP work skipped: in ``static`` mode the fraction of
    intermediate neurons dropped for every token (chosen by a learned score), in ``dynamic``
    mode the fraction of activations entering each projection that are skipped per token
    (smallest magnitudes first, thresholds calibrated offline). ``0`` is the dense layer.
    """

    sparse_ratio: float = 0.0
    attention_sparse_ratio: float = 0.0
    mode: str = "dynamic"
    attention_block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 2
    # Attention: keep this many keys (rounded up to whole blocks) instead of a fraction; None = use the ratio.
    attention_keep_keys: int | None = None
    # Dynamic mode, batched: if the fraction of weight rows that at least one token of the batch
    # needs is above this, the sparse kernel would read nearly everything with worse efficiency
    # than cuBLAS, so the layer runs dense GEMMs on the masked activations instead. (H100, 4096 x
    # 11008: the gather kernels still won at a predicted union of 0.94 - 1.09x at 4 tokens, ratio
    # 0.5; 1.06x at 8 tokens, ratio 0.7 - and tied at 0.996.)
    dense_fallback_union: float = 0.95

    def __post_init__(self) -> None:
        for name in ("sparse_ratio", "attention_sparse_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SparsityConfigError(f"{name}: expected a number in [0, 1), got {value!r}")
            if not 0.0 <= float(value) < 1.0:
                raise SparsityConfigError(f"{name}: expected a value in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        if self.mode not in MODES:
            raise SparsityConfigError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("attention_block_size", "sink_blocks", "local_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SparsityConfigError(f"{name}: expected an integer, got {value!r}")
        if self.attention_block_size < 1:
            raise SparsityConfigError(
                f"attention_block_size: expected a positive integer, got {self.attention_block_size}"
            )
        for name in ("sink_blocks", "local_blocks"):
            if getattr(self, name) < 0:
                raise SparsityConfigError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        keep = self.attention_keep_keys
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise SparsityConfigError(f"attention_keep_keys: expected None or an integer >= 1, got {keep!r}")
        if not 0.0 < float(self.dense_fallback_union) <= 1.0:
            raise SparsityConfigError(
                f"dense_fallback_union: expected a value in (0, 1], got {self.dense_fallback_union!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SparsityConfigError(
                f"{unknown[0]}: unknown field (expected one of {', '.join(sorted(known))})"
            )
        return cls(**data)
