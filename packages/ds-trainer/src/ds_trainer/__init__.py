"""DistributedTrainer on HF accelerate and the ds-train CLI: DDP/FSDP, mixed precision, exact resume,
LoRA, distillation, DP-SGD, metrics, and task plugins (``ds_trainer.tasks``)."""

from ds_trainer.__about__ import __version__
from ds_trainer.checkpoint import CheckpointManager
from ds_trainer.config import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    DistributedConfig,
    DPConfig,
    EvalConfig,
    LoggingConfig,
    LoRAConfig,
    ModelSpec,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
)
from ds_trainer.errors import TrainerError
from ds_trainer.metrics import read_metrics
from ds_trainer.result import TrainResult
from ds_trainer.tasks import Task, register_task
from ds_trainer.trainer import DistributedTrainer

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "DPConfig",
    "DataConfig",
    "DistillConfig",
    "DistributedConfig",
    "DistributedTrainer",
    "EvalConfig",
    "LoRAConfig",
    "LoggingConfig",
    "ModelSpec",
    "OptimConfig",
    "PrecisionConfig",
    "ScheduleConfig",
    "Task",
    "TrainConfig",
    "TrainResult",
    "TrainerError",
    "__version__",
    "read_metrics",
    "register_task",
]
