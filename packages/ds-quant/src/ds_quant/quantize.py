"""Quantize a ds model: decide each layer's precision, build the packed weights, swap the modules.

In the style of gpt-fast's ``quantize.py``: the handler first builds the quantized tensors
(round-to-nearest, or GPTQ with calibration tokens), then replaces every chosen ``nn.Linear``
by its runtime twin `QuantLinear` and ``embed_tokens`` by `QuantEmbedding`. The model file
(ds_models.model) knows nothing about quantization. Static-sparse MLPs are first swapped for the
dense MLP of their kept neurons (gathered_mlp.py), so only those neurons are quantized.

Per-layer precision: every ``nn.Linear`` and ``embed_tokens`` gets ``bits``; ``overrides`` maps
fnmatch patterns over module names to 4, 8 or ``float`` (kept as is), later patterns winning::

    QuantConfig(bits=4, overrides={"lm_head": 8, "layers.0.*": "float"})

With tied embeddings (``tie_embeddings: true``) ``embed_tokens`` and ``lm_head`` are one matrix
and get one precision: an override naming either applies to both.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ds_quant.errors import DsQuantError
from ds_quant.gathered_mlp import gather_static_mlps
from ds_quant.gptq import GPTQConfig, gptq_layers
from ds_quant.packing import PackedWeight, check_format, quantize_weight
from ds_quant.quant_linear import QuantEmbedding, QuantLinear

METHODS = ("rtn", "gptq")
FLOAT = "float"


@dataclass
class QuantConfig:
    bits: int = 4  # 4 | 8: the default for every linear and the embeddings
    group_size: int = 128  # values per scale along the input dimension (MatMulNBits block_size)
    sym: bool = True  # symmetric (no zero points) or asymmetric
    method: str = "rtn"  # "rtn" round-to-nearest | "gptq" (needs calibration tokens)
    overrides: dict[str, Any] = field(default_factory=dict)  # module-name pattern -> 4 | 8 | "float"
    calib: str | None = None  # where calibration text came from (recorded; the CLI reads it)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    def __post_init__(self) -> None:
        check_format(self.bits, self.group_size)
        if not isinstance(self.sym, bool):
            raise DsQuantError(f"sym: expected true or false, got {self.sym!r}")
        if self.method not in METHODS:
            raise DsQuantError(f"method: unknown {self.method!r}; expected one of {', '.join(METHODS)}")
        if isinstance(self.gptq, dict):
            known = {f.name for f in dataclasses.fields(GPTQConfig)}
            unknown = sorted(set(self.gptq) - known)
            if unknown:
                raise DsQuantError(
                    f"gptq.{unknown[0]}: unknown field; expected some of {', '.join(sorted(known))}"
                )
            self.gptq = GPTQConfig(**self.gptq)
        if not isinstance(self.overrides, dict):
            raise DsQuantError(
                f"overrides: expected a mapping of module pattern: bits, got {self.overrides!r}"
            )
        self.overrides = {str(k): _precision(v, f"overrides.{k}") for k, v in self.overrides.items()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = {k: (FLOAT if v is None else v) for k, v in self.overrides.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> QuantConfig:
        if not isinstance(d, dict):
            raise DsQuantError(f"{where}: expected a mapping of field: value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DsQuantError(
                f"{where}: {unknown[0]}: unknown field; expected some of {', '.join(sorted(known))}"
            )
        try:
            return cls(**d)
        except DsQuantError as e:
            raise DsQuantError(f"{where}: {e}") from None
        except TypeError as e:
            raise DsQuantError(f"{where}: {e}") from None


def _precision(v: Any, where: str) -> int | None:
    """4 / 8 -> bits; "float" / 16 / 32 -> None (keep the float module)."""
    if v in (FLOAT, 16, 32, "16", "32"):
        return None
    try:
        bits = int(v)
    except (TypeError, ValueError):
        raise DsQuantError(f"{where}: expected 4, 8 or 'float', got {v!r}") from None
    check_format(bits, 128, where=where)
    return bits


# --- the plan ---------------------------------------------------------------------------------


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the modules a plan covers: every nn.Linear, plus embed_tokens."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (
        ["embed_tokens", *names] if isinstance(getattr(model, "embed_tokens", None), nn.Embedding) else names
    )


def plan_precision(model: nn.Module, config: QuantConfig) -> dict[str, int | None]:
    """{module name: bits, or None to keep it float}, overrides applied, tied embeddings paired."""
    names = quantizable_modules(model)
    plan: dict[str, int | None] = dict.fromkeys(names, config.bits)
    explicit: dict[str, int | None] = {}
    for pattern, bits in config.overrides.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise DsQuantError(
                f"overrides: {pattern!r}: matches no module (e.g. lm_head, layers.0.mlp.down_proj)"
            )
        for n in hits:
            plan[n] = explicit[n] = bits
    if getattr(model.config, "tie_embeddings", False) and "embed_tokens" in plan and "lm_head" in plan:
        e, h = explicit.get("embed_tokens", "unset"), explicit.get("lm_head", "unset")
        if e != "unset" and h != "unset" and e != h:
            raise DsQuantError(
                "overrides: embed_tokens and lm_head are tied (tie_embeddings: true); give them one precision"
            )
        plan["embed_tokens"] = plan["lm_head"] = h if h != "unset" else e if e != "unset" else config.bits
    return plan


def refuse_sparse_projections(model: nn.Module) -> None:
    """ds-models' ``sparse_projections: all`` sparsifies the attention projections' inputs
    (ds-core DynamicSparseLinear); a QuantLinear in their place would silently compute them
    densely, and the ONNX graph has no such op: refuse, naming the config field."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "sparse_projections", "mlp") == "all" and getattr(cfg, "sparse_ratio", 0.0) > 0:
        raise DsQuantError(
            "config: sparse_projections: 'all' (activation-sparse attention projections) is not "
            "supported by ds-quant yet; use a model with sparse_projections: mlp"
        )


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


# --- the handler ------------------------------------------------------------------------------


@torch.no_grad()
def quantize(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    *,
    sym: bool = True,
    method: str = "rtn",
    overrides: dict[str, Any] | None = None,
    calibration: torch.Tensor | None = None,
    config: QuantConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Quantize a ds_models.Transformer in place (weight-only, group-wise) and return it.

    calibration: (n, seq_len) token ids, required for method="gptq". `config` replaces the
    keyword arguments when given. The result runs in PyTorch and saves with `save_quantized`.
    """
    if config is None:
        config = QuantConfig(
            bits=bits, group_size=group_size, sym=sym, method=method, overrides=overrides or {}
        )
    if is_quantized(model):
        raise DsQuantError(
            "model: already quantized (it holds QuantLinear modules); start from the float model"
        )
    refuse_sparse_projections(model)
    # Static-sparse MLPs become the dense MLP of their kept neurons: the dropped rows are never
    # quantized, stored or exported (gathered_mlp.py). The plan's module names do not change.
    gather_static_mlps(model)
    plan = plan_precision(model, config)
    packed: dict[str, PackedWeight] = {}
    if config.method == "gptq":
        if calibration is None:
            raise DsQuantError("method: gptq needs calibration token ids (--calib FILE or builtin)")
        if calibration.dim() != 2:
            raise DsQuantError(
                f"calibration: expected (n, seq_len) token ids, got shape {tuple(calibration.shape)}"
            )
        layer_plan = {n: b for n, b in plan.items() if n.startswith("layers.") or n == "lm_head"}
        packed.update(
            gptq_layers(
                model, layer_plan, calibration, block_size=config.group_size, sym=config.sym, config=config.gptq,
                progress=progress,
            )
        )  # fmt: skip
    modules = dict(model.named_modules())
    clip = config.method == "gptq" and config.gptq.clip_search
    for name, b in plan.items():
        if b is None or name in packed or name == "embed_tokens":
            continue
        # Round-to-nearest: everything under rtn; under gptq the lm_head unless gptq.lm_head is off.
        packed[name] = quantize_weight(
            modules[name].weight, b, config.group_size, config.sym, clip_search=clip
        )
    if plan.get("embed_tokens") is not None and not _tied(model):
        packed["embed_tokens"] = quantize_weight(
            model.embed_tokens.weight, plan["embed_tokens"], config.group_size, config.sym, clip_search=clip
        )
    swap_modules(model, packed)
    model.quant_config = config  # type: ignore[assignment]
    return model


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_embeddings", False))


def swap_modules(model: nn.Module, packed: dict[str, PackedWeight]) -> None:
    """Replace each named nn.Linear / embed_tokens by its quantized twin holding `packed[name]`."""
    for name, p in packed.items():
        if name == "embed_tokens":
            emb = QuantEmbedding(
                p.out_features, p.in_features, bits=p.bits, block_size=p.block_size, sym=p.sym
            )
            emb.table = QuantLinear.from_packed(p)
            emb.table.lookup_only = True
            model.embed_tokens = emb
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, QuantLinear.from_packed(p, old.bias))
    if _tied(model) and isinstance(model.lm_head, QuantLinear):
        model.embed_tokens = QuantEmbedding(
            model.config.vocab_size, model.config.d_model, bits=model.lm_head.bits,
            block_size=model.lm_head.block_size, sym=model.lm_head.sym, tied_to=model.lm_head,
        )  # fmt: skip


def layer_precisions(model: nn.Module) -> dict[str, int | str]:
    """What a (quantized) model holds: {module name: bits or "float"} over the plan's modules."""
    out: dict[str, int | str] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding) or (isinstance(m, QuantLinear) and not name.endswith(".table")):
            out[name] = m.bits
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            out[name] = FLOAT
    return out
