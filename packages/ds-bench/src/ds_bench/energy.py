"""Energy counters: NVML on NVIDIA GPUs, RAPL on CPUs, or a stated reason why there is none.

Both are cumulative hardware counters read before and after the measured run, never a power model:
  NVML  nvmlDeviceGetTotalEnergyConsumption (millijoules since the driver loaded; Volta and newer)
  RAPL  /sys/class/powercap/intel-rapl:N/energy_uj, one per CPU package (microjoules). It wraps
        at max_energy_range_uj; `read()` is called often enough (the run loop samples it once a
        second) that a wrap is seen as one step backwards and corrected.
`open_meter(device)` returns a meter whose `stop()` gives joules, or `Unavailable(reason)`; the
reason reaches the result file, so a reader sees "no energy counter: ..." rather than a number.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ds_bench.metrics import Unavailable

RAPL_ROOT = Path("/sys/class/powercap")


class RaplMeter:
    """Sum of the package-level RAPL zones (intel-rapl:N, not their sub-zones, which they include)."""

    def __init__(self, root: str | os.PathLike[str] = RAPL_ROOT) -> None:
        self.root = Path(root)
        self.zones = sorted(p for p in self.root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not self.zones:
            raise OSError(f"{self.root}: no intel-rapl:N zones (no RAPL powercap driver)")
        self.max_uj = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self.last = [self._read_uj(z) for z in self.zones]
        self.total_uj = 0
        self.lock = threading.Lock()

    @staticmethod
    def _read_uj(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read(self) -> float:
        """Joules since this meter was opened."""
        with self.lock:
            for i, z in enumerate(self.zones):
                now = self._read_uj(z)
                delta = now - self.last[i]
                if delta < 0:  # the counter wrapped around max_energy_range_uj
                    delta += self.max_uj[i]
                self.total_uj += delta
                self.last[i] = now
            return self.total_uj / 1e6

    def describe(self) -> str:
        return f"RAPL ({len(self.zones)} package zone(s) under {self.root})"


class NvmlMeter:
    """NVML's total energy counter of one GPU (millijoules, 64-bit: no wrap in practice)."""

    def __init__(self, index: int = 0) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.name = pynvml.nvmlDeviceGetName(self.handle)
        self.start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def read(self) -> float:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start_mj) / 1e3

    def describe(self) -> str:
        name = self.name.decode() if isinstance(self.name, bytes) else self.name
        return f"NVML total energy of GPU {name}"


Meter = RaplMeter | NvmlMeter


def open_meter(device: str, *, rapl_root: str | os.PathLike[str] = RAPL_ROOT) -> Meter | Unavailable:
    """The energy counter for `device` ("cpu", "cuda", "cuda:N"), or why none can be read."""
    if device.startswith("cuda"):
        try:
            import pynvml  # noqa: F401  (nvidia-ml-py, the `nvml` extra)
        except ImportError:
            return Unavailable(
                "no energy counter: nvidia-ml-py is not installed (pip install 'ds-bench[nvml]')"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        try:
            return NvmlMeter(index)
        except Exception as e:  # NVMLError_NotSupported, NVMLError_LibraryNotFound, ...
            return Unavailable(f"no energy counter: NVML on GPU {index}: {e}")
    try:
        return RaplMeter(rapl_root)
    except PermissionError as e:
        return Unavailable(
            f"no energy counter: RAPL is not readable ({e.filename}: permission denied; needs root)"
        )
    except (OSError, ValueError) as e:
        return Unavailable(f"no energy counter: {e}")


class EnergySampler:
    """Reads a meter once a second in the background so that a RAPL wrap is never missed."""

    def __init__(self, meter: Meter | Unavailable, interval: float = 1.0) -> None:
        self.meter = meter
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_j = 0.0

    def start(self) -> None:
        if isinstance(self.meter, Unavailable):
            return
        self._start_j = self.meter.read()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        assert not isinstance(self.meter, Unavailable)
        while not self._stop.wait(self.interval):
            self.meter.read()

    def stop(self) -> float | Unavailable:
        if isinstance(self.meter, Unavailable):
            return self.meter
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.meter.read() - self._start_j
