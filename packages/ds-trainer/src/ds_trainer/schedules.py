"""Learning-rate schedules as ``torch.optim.lr_scheduler.LambdaLR`` multipliers.

- warmup-cosine: linear warmup to the peak, then a cosine down to ``min_lr_ratio`` at the last step.
- warmup-stable-decay (WSD, MiniCPM / "Scaling Laws and Compute-Optimal Training Beyond Fixed
  Training Durations"): linear warmup, a long constant phase, then a linear decay over the last
  ``decay_fraction`` of the steps. The stable phase lets a run be extended without restarting.
- constant: linear warmup, then flat.

The multipliers are plain dataclass instances (not closures) so that ``LambdaLR.state_dict()``
stores their fields and the state loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ds_trainer.config import ScheduleConfig


@dataclass
class LRMultiplier:
    name: str
    total_steps: int
    warmup_steps: int
    decay_fraction: float
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        # `step` counts optimizer steps already taken: step 0 trains with the first multiplier.
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        lo = self.min_lr_ratio
        if self.name == "warmup-cosine":
            span = max(1, self.total_steps - self.warmup_steps - 1)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # warmup-stable-decay
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, self.total_steps - decay_start))
        return 1.0 - (1.0 - lo) * progress


def lr_multiplier(config: ScheduleConfig, total_steps: int) -> LRMultiplier:
    return LRMultiplier(
        name=config.name,
        total_steps=total_steps,
        warmup_steps=min(config.warmup_steps, max(0, total_steps - 1)),
        decay_fraction=config.decay_fraction,
        min_lr_ratio=config.min_lr_ratio,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps))
