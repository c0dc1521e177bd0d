"""DistributedTrainer: the public entry point of a training run.

    DistributedTrainer(config | model_path=..., gpus_per_node=..., nodes=..., **overrides).train(epochs=... | steps=...)

In a single process it trains (run.py). Asked for more processes than the current group has, it
launches itself through torchrun (launch.py) and reads the result back. A progressive
distillation chain (``distill.stages``) is a sequence of such runs, each stage's model teaching the
next.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_trainer import launch
from ds_trainer.checkpoint import find_resume
from ds_trainer.config import TrainConfig
from ds_trainer.distill import stage_specs
from ds_trainer.errors import TrainerError
from ds_trainer.result import TrainResult
from ds_trainer.run import Run

__all__ = ["DistributedTrainer", "TrainResult"]


class DistributedTrainer:
    def __init__(
        self,
        config: TrainConfig | str | os.PathLike | dict | None = None,
        *,
        model_path: str | None = None,
        gpus_per_node: int | None = None,
        nodes: int | str | None = None,
        model: nn.Module | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        **overrides: Any,
    ):
        """``config``: a TrainConfig, a YAML path or a dict. Keyword overrides use ``__`` for the
        dot: ``DistributedTrainer("small.yaml", optim__lr=1e-3)``. ``model`` / ``train_dataset``
        (rows of ``{"input_ids": (seq_len + 1,)}``) replace what the config would build for
        ``task: lm``, for callers such as the benchmarks; other tasks build their own."""
        if config is None:
            cfg = TrainConfig()
        elif isinstance(config, TrainConfig):
            cfg = config
        elif isinstance(config, dict):
            cfg = TrainConfig.from_dict(config)
        else:
            cfg = TrainConfig.from_yaml(config)
        changes: dict[str, Any] = {k.replace("__", "."): v for k, v in overrides.items()}
        if model_path is not None:
            changes["model.path"] = str(model_path)
        if gpus_per_node is not None:
            changes["distributed.gpus_per_node"] = gpus_per_node
        if nodes is not None:
            changes["distributed.nodes"] = str(nodes)
        self.config = cfg.replace(**changes) if changes else cfg
        self.model = model
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset

    def train(self, *, epochs: float | None = None, steps: int | None = None) -> TrainResult:
        cfg = self.config
        if epochs is not None:
            cfg = cfg.replace(**{"schedule.epochs": epochs, "schedule.steps": 0})
        if steps is not None:
            cfg = cfg.replace(**{"schedule.steps": steps})
        if cfg.distill.stages:
            return _train_chain(cfg)
        if launch.needs_launch(cfg):
            if self.model is not None or self.train_dataset is not None:
                raise TrainerError(
                    "distributed: objects passed to DistributedTrainer cannot travel to launched processes; "
                    "start the script with torchrun instead"
                )
            _check_before_launch(cfg)  # bad input fails here, before any process starts
            find_resume(cfg)
            gpus = torch.cuda.device_count()
            if gpus and not cfg.distributed.cpu and cfg.distributed.gpus_per_node > gpus:
                raise TrainerError(
                    f"distributed.gpus_per_node: {cfg.distributed.gpus_per_node} processes, but this node has "
                    f"{gpus} GPUs (set distributed.cpu=true to run CPU processes)"
                )
            rc = launch.launch(cfg)
            result_path = Path(cfg.output_dir) / "result.json"
            if rc != 0:
                raise RuntimeError(f"ds-train: the launched processes failed with exit code {rc}")
            return TrainResult.from_json(json.loads(result_path.read_text()))
        return Run(cfg, self.model, self.train_dataset, self.eval_dataset).run()


def _check_before_launch(cfg: TrainConfig) -> None:
    if cfg.task == "lm":
        from ds_trainer.lm import check_paths

        check_paths(cfg)
    else:  # unknown task or bad options: one line here rather than one per child process
        from ds_trainer.tasks import build_task, registered_in_process_only

        build_task(cfg)
        if registered_in_process_only(cfg.task):
            raise TrainerError(
                f"task: {cfg.task} is registered in this process only (register_task), which the launched "
                "processes cannot see; declare it as a ds_trainer.tasks entry point or use task: package.module:Class"
            )


def _train_chain(cfg: TrainConfig) -> TrainResult:
    """Progressive distillation: each stage's model is the next stage's teacher."""
    results = []
    for spec in stage_specs(cfg.distill.teacher, cfg.distill.stages, cfg.output_dir):
        stage_cfg = cfg.replace(
            **{
                "model.path": spec["model"],
                "model.overrides": spec["overrides"],
                "distill.teacher": spec["teacher"],
                "distill.stages": [],
                "schedule.steps": spec["steps"],
                "output_dir": spec["output_dir"],
            }
        )
        results.append(DistributedTrainer(stage_cfg).train())
    last = results[-1]
    last.stages = [
        {"model": s["model"], "teacher": s["teacher"], "output_dir": r.output_dir, "model_dir": r.model_dir,
         "final_loss": r.losses[max(r.losses)] if r.losses else None, "eval_loss": r.eval_loss}
        for s, r in zip(stage_specs(cfg.distill.teacher, cfg.distill.stages, cfg.output_dir), results)
    ]  # fmt: skip
    return last
