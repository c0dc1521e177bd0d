"""TrainResult: what a run returns (and writes to ``output_dir/result.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainResult:
    output_dir: str
    model_dir: str | None  # the final model directory (None when the run stopped early by request)
    step: int  # optimizer steps done
    total_steps: int
    losses: dict[int, float]  # step -> training loss
    eval_loss: float | None = None
    stopped_early: bool = False
    epsilon: float | None = None  # DP-SGD: privacy spent, for dp.delta
    trainable_fraction: float | None = None  # LoRA
    resumed_from: str | None = None
    world_size: int = 1  # processes that trained
    stages: list[dict] = field(default_factory=list)  # progressive distillation
    task: str = "lm"
    parallelism: str = "single process"  # what actually ran: "single process", "ddp" or "fsdp2"

    def to_json(self) -> dict:
        d = asdict(self)
        d["losses"] = {str(k): v for k, v in self.losses.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainResult:
        d = dict(d)
        d["losses"] = {int(k): v for k, v in d["losses"].items()}
        return cls(**d)
