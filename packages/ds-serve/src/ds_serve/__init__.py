"""ds-serve: a continuous-batching HTTP server for ds models (OpenAI-compatible API, Prometheus metrics)."""

from ds_serve.__about__ import __version__
from ds_serve.scheduler import Request, Scheduler, SchedulerConfig, ServeError

__all__ = ["Request", "Scheduler", "SchedulerConfig", "ServeError", "__version__"]
