"""DistributedTrainer on HF accelerate and the ds-train CLI: DDP/FSDP, mixed precision, exact resume, LoRA, distillation, DP-SGD, metrics."""

from ds_trainer.__about__ import __version__

__all__ = ["__version__"]
