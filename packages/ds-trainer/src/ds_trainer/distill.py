"""Logit knowledge distillation (Hinton et al., 2015) and progressive chains of stages.

The student's loss mixes the KL divergence to the teacher's tempered distribution with the usual
cross-entropy on the data; the KL term is scaled by T^2 so its gradients keep their size as the
temperature changes. Both terms are token sums, normalised by the caller over the accumulation
window like the plain loss.

A progressive chain (distill.stages) distils a large teacher in steps (teacher -> intermediate ->
student) so that each student learns from a teacher not too far above it (TAKD, Mirzadeh et al.
2020): stage i trains its model with stage i-1's result as the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_token_sum(
    student_logits: torch.Tensor,  # (B, T, V)
    teacher_logits: torch.Tensor,  # (B, T, V)
    targets: torch.Tensor,  # (B, T), -100 = ignored
    temperature: float,
) -> torch.Tensor:
    """Sum over valid tokens of T^2 * KL(teacher_T || student_T)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    return (kl * (targets != -100)).sum() * temperature**2


def stage_specs(teacher: str, stages: list[dict], output_dir: str) -> list[dict]:
    """For each stage: its model spec, steps, teacher and output directory."""
    out = []
    prev = teacher
    for i, stage in enumerate(stages):
        stage_dir = f"{output_dir}/stage_{i}"
        out.append(
            {
                "model": stage["model"],
                "overrides": dict(stage.get("overrides", {})),
                "steps": stage["steps"],
                "teacher": prev,
                "output_dir": stage_dir,
            }
        )
        prev = f"{stage_dir}/model"
    return out
