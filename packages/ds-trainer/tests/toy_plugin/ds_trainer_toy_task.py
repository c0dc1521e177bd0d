"""A task plugin as another package would ship it: noisy regression with a small MLP.

The test suite puts this directory on sys.path and declares it under the entry-point group
``ds_trainer.tasks`` (a generated ``.dist-info``), so it is found exactly as an installed plugin
is, in the test process and in the processes torchrun starts.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_trainer.tasks import Task


class Layer(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class Regressor(nn.Module):
    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([Layer(features, hidden), Layer(hidden, hidden)])
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B,)
        for layer in self.layers:
            x = layer(x)
        return self.head(x).sum(-1)  # not a view of the head output (FSDP2 warns about views)


class ToyRegressionTask(Task):
    """y = sin(x . w) + noise; loss = mse + l1_weight * mean |error|, both logged as terms."""

    name = "toy-regression"
    fsdp_units = ("Layer",)

    def __init__(self, options: dict, cfg) -> None:
        super().__init__(options, cfg)
        self.opts = self.read_options(
            {"features": 8, "hidden": 32, "train_items": 256, "eval_items": 64, "l1_weight": 0.1, "seed": 0}
        )
        if self.opts["train_items"] < 1:
            raise ValueError(
                f"task_options.train_items: expected a positive int, got {self.opts['train_items']}"
            )

    def build_model(self) -> nn.Module:
        return Regressor(self.opts["features"], self.opts["hidden"])

    def build_datasets(self):
        g = torch.Generator().manual_seed(self.opts["seed"])
        n, f = self.opts["train_items"] + self.opts["eval_items"], self.opts["features"]
        x = torch.randn(n, f, generator=g)  # (N, F)
        w = torch.randn(f, generator=g) / f**0.5
        y = torch.sin(2 * x @ w) + 0.05 * torch.randn(n, generator=g)  # (N,)
        items = [{"x": x[i], "y": y[i]} for i in range(n)]
        return items[: self.opts["train_items"]], items[self.opts["train_items"] :]

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        err = model(batch["x"]).float() - batch["y"]  # (B,)
        mse, l1 = err.pow(2).mean(), err.abs().mean()
        return mse + self.opts["l1_weight"] * l1, {"loss/mse": mse.item(), "loss/l1": l1.item()}
