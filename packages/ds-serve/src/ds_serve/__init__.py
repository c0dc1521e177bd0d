"""ds-serve: a continuous-batching HTTP server for ds models (OpenAI-compatible API, Prometheus metrics)."""

from ds_serve.__about__ import __version__
from ds_serve.engine import Engine, TorchEngine
from ds_serve.scheduler import Request, Scheduler, SchedulerConfig, ServeError

__all__ = ["Engine", "Request", "Scheduler", "SchedulerConfig", "ServeError", "TorchEngine", "__version__"]
