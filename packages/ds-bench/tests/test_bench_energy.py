"""Energy counters: RAPL read from a sysfs tree laid out in tmp_path, and unavailability with a reason."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ds_bench.energy import EnergySampler, RaplMeter, open_meter
from ds_bench.metrics import Unavailable


def zone(root: Path, name: str, energy_uj: int, max_uj: int = 1_000_000) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (z / "name").write_text("package-0\n")
    return z


def set_energy(z: Path, uj: int) -> None:
    (z / "energy_uj").write_text(f"{uj}\n")


def test_rapl_sums_package_zones_and_skips_subzones(tmp_path):
    p0 = zone(tmp_path, "intel-rapl:0", 100)
    p1 = zone(tmp_path, "intel-rapl:1", 5_000)
    core = zone(tmp_path, "intel-rapl:0:0", 0)  # inside package 0: counting it would double count
    meter = RaplMeter(tmp_path)
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    set_energy(p0, 2_100_100)  # +2.1 J
    set_energy(p1, 900_000)  # +0.895 J
    set_energy(core, 9_000_000)
    assert meter.read() == pytest.approx(2.1 + 0.895)


def test_rapl_wraparound_is_corrected(tmp_path):
    z = zone(tmp_path, "intel-rapl:0", 900_000, max_uj=1_000_000)
    meter = RaplMeter(tmp_path)
    set_energy(z, 950_000)  # +0.05 J
    assert meter.read() == pytest.approx(0.05)
    set_energy(z, 100_000)  # wrapped: 950000 -> 1000000 -> 100000 = +0.15 J
    assert meter.read() == pytest.approx(0.20)
    set_energy(z, 300_000)  # +0.2 J
    assert meter.read() == pytest.approx(0.40)


def test_sampler_gives_joules_of_its_window(tmp_path):
    z = zone(tmp_path, "intel-rapl:0", 1_000)
    meter = open_meter("cpu", rapl_root=tmp_path)
    assert isinstance(meter, RaplMeter)
    set_energy(z, 3_000)  # before the window: not counted
    sampler = EnergySampler(meter, interval=0.01)
    sampler.start()
    set_energy(z, 503_000)
    assert sampler.stop() == pytest.approx(0.5)


def test_no_rapl_is_unavailable_with_the_reason(tmp_path):
    meter = open_meter("cpu", rapl_root=tmp_path / "missing")
    assert isinstance(meter, Unavailable)
    assert "no energy counter" in meter.reason and "intel-rapl" in meter.reason
    sampler = EnergySampler(meter)
    sampler.start()
    assert sampler.stop() == meter  # the reason travels into the metrics, not a number


def test_unreadable_rapl_zone_is_unavailable(tmp_path):
    z = tmp_path / "intel-rapl:0"
    z.mkdir()
    (z / "energy_uj").write_text("12\n")  # max_energy_range_uj missing: can't handle wraps
    meter = open_meter("cpu", rapl_root=tmp_path)
    assert isinstance(meter, Unavailable) and "max_energy_range_uj" in meter.reason


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is None, reason="nvidia-ml-py not installed")
def test_nvml_without_a_gpu_is_unavailable_with_the_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: NVML works here")
    meter = open_meter("cuda:0")
    assert isinstance(meter, Unavailable) and "NVML" in meter.reason
