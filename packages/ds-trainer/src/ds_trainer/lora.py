"""LoRA fine-tuning with peft, and the merge back into a plain ds-models state dict.

peft's ``inject_adapter_in_model`` swaps the targeted ``nn.Linear``s (ds-models names them like HF
Llama: q/k/v/o_proj, gate/up/down_proj) for LoRA layers in place, so the model keeps its class and
forward signature, and freezes everything but the adapters. The merge works on a full state dict
(``W + B @ A * alpha / r``), so it needs no peft objects and works on what FSDP gathers too.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_trainer.config import LoRAConfig
from ds_trainer.errors import TrainerError

ADAPTER = "default"


def apply_lora(model: nn.Module, config: LoRAConfig) -> dict:
    """Inject LoRA adapters in place; return {trainable, total, fraction} parameter counts."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise TrainerError("lora.enabled: needs peft (pip install 'ds-trainer[lora]')") from None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in config.target_modules if t not in names]
    if missing:
        raise TrainerError(
            f"lora.target_modules: {missing[0]!r} is not a Linear of the model (has {', '.join(sorted(names))})"
        )
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
    )
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    return trainable_stats(model)


def trainable_stats(model: nn.Module) -> dict:
    # Count each parameter once (tied embeddings share one tensor).
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(1, total)}


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a full state dict (what a checkpoint needs to resume the adapters)."""
    return {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def merged_state(state: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """A plain ds-models state dict: every LoRA layer becomes ``W + (B @ A) * alpha / r``."""
    scale = config.alpha / config.r
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        prefix, _, leaf = key.partition(".base_layer.")
        if leaf == "weight":
            a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
            b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
            value = (value.float() + (b @ a) * scale).to(value.dtype)
        out[f"{prefix}.{leaf}"] = value
    return out
