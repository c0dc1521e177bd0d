"""An 18-metric benchmark suite with MLPerf LoadGen scenarios, energy counters and side-by-side baselines."""

from ds_bench.__about__ import __version__

__all__ = ["__version__"]
