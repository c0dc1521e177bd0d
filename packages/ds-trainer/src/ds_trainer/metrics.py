"""Training metrics: a JSONL log, TensorBoard, and a Prometheus endpoint per node.

Every record carries step, loss, lr, grad norm, tokens/s (examples/s for task plugins), memory and
the named loss terms of the step (a task's "loss/text_image", "ce" when distilling): JSONL keys,
TensorBoard scalars ``train/<name>``, and on Prometheus one gauge ``ds_train_term{name="..."}``
since the names are the task's. The JSONL log and TensorBoard
are written by the main process only; the Prometheus endpoint is served by the first process of
each node (local rank 0) so that a scraper sees every node, each reporting its own device memory.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from ds_trainer.config import LoggingConfig
from ds_trainer.errors import TrainerError

PROM_GAUGES = {
    "step": "Optimizer steps taken",
    "loss": "Training loss (mean over the target tokens of the last optimizer step)",
    "lr": "Learning rate",
    "grad_norm": "Global gradient norm before clipping",
    "tokens_per_second": "Training throughput over all processes (task lm)",
    "examples_per_second": "Training throughput over all processes (task plugins)",
    "eval_loss": "Last evaluation loss",
}
_NOT_TERMS = {"epoch", "memory_peak_bytes"}


def memory_bytes(device: torch.device) -> dict[str, int]:
    """Peak memory of this process: device memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {
            "allocated": torch.cuda.memory_allocated(device),
            "peak": torch.cuda.max_memory_allocated(device),
        }
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | os.PathLike,
        config: LoggingConfig,
        *,
        is_main: bool,
        is_local_main: bool,
        device: torch.device,
        resume: bool = False,
    ):
        self.config = config
        self.device = device
        self.is_main = is_main
        self._jsonl = None
        self._tb = None
        self._server = None
        out = Path(output_dir)
        if is_main and config.jsonl:
            out.mkdir(parents=True, exist_ok=True)
            # A resumed run appends: the log then reads as one run (steps after the checkpoint that
            # were logged by the killed run appear twice; readers keep the last record per step).
            self._jsonl = open(out / "metrics.jsonl", "a" if resume else "w")  # noqa: SIM115
        if is_main and config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainerError(
                    "logging.tensorboard: needs the tensorboard package (pip install 'ds-trainer[tensorboard]')"
                ) from None
            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if is_local_main and config.prometheus_port:
            self._start_prometheus(config.prometheus_port)

    def _start_prometheus(self, port: int) -> None:
        try:
            import prometheus_client
        except ImportError:
            raise TrainerError(
                "logging.prometheus_port: needs prometheus-client (pip install 'ds-trainer[metrics]')"
            ) from None
        self.registry = prometheus_client.CollectorRegistry()
        self._gauges = {
            name: prometheus_client.Gauge(f"ds_train_{name}", doc, registry=self.registry)
            for name, doc in PROM_GAUGES.items()
        }
        self._gauges["eval_loss"].set(float("nan"))  # no evaluation yet
        # Named loss terms and other metrics of a task ("loss/text_image", "ce", "eval_recall@1"):
        # one gauge with the name as a label, since the names are the task's.
        self._terms = prometheus_client.Gauge(
            "ds_train_term", "A named loss term or metric of the task", ["name"], registry=self.registry
        )
        self._memory = prometheus_client.Gauge(
            "ds_train_memory_bytes", "Memory of this node's first process", ["kind"], registry=self.registry
        )
        try:
            self._server, self._thread = prometheus_client.start_http_server(port, registry=self.registry)
        except OSError as e:
            raise TrainerError(
                f"logging.prometheus_port: cannot serve on port {port} ({e.strerror})"
            ) from None

    @property
    def prometheus_port(self) -> int | None:
        return self._server.server_port if self._server is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        mem = memory_bytes(self.device)
        record["memory_peak_bytes"] = mem["peak"]
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        if self._server is not None:
            self._gauges["step"].set(step)
            for k, v in record.items():
                if k == "step" or not isinstance(v, (int, float)) or k in _NOT_TERMS:
                    continue
                if k in self._gauges:
                    self._gauges[k].set(v)
                else:
                    self._terms.labels(name=k).set(v)
            for kind, value in mem.items():
                self._memory.labels(kind=kind).set(value)
        return record

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl, the last one per step (a resumed run re-logs a few steps)."""
    by_step: dict[int, dict] = {}
    extra = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec and "loss" in rec:
                by_step[rec["step"]] = rec
            else:
                extra.append(rec)
    return [by_step[s] for s in sorted(by_step)] + extra
