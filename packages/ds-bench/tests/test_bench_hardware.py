"""Peaks for utilisation: CPU peaks are measured, as a running best; GPU peaks come from datasheets."""

from __future__ import annotations

from ds_bench.hardware import GPU_PEAKS, measure_cpu_peaks


def test_cpu_peaks_are_a_running_best_and_bandwidth_is_shared_across_dtypes():
    fp32 = measure_cpu_peaks("fp32", seconds=0.05, sizes=(256,))
    assert fp32.flops > 1e8 and fp32.bytes_per_s > 1e8 and "measured on this CPU" in fp32.source
    bf16 = measure_cpu_peaks("bf16", seconds=0.05, sizes=(256,))
    # One memory system: a bf16 run is judged against the best copy bandwidth seen, fp32's included.
    assert bf16.bytes_per_s >= fp32.bytes_per_s
    again = measure_cpu_peaks("fp32", seconds=0.05, sizes=(256,))
    assert again.flops >= fp32.flops and again.bytes_per_s >= bf16.bytes_per_s


def test_gpu_datasheet_names_match_most_specific_first():
    names = [name for name, _, _ in GPU_PEAKS]
    # "H100 PCIe" / "H100 NVL" must be tried before the bare "H100" (SXM) they contain.
    assert names.index("H100 PCIe") < names.index("H100") and names.index("H100 NVL") < names.index("H100")
    h100 = dict((n, (f, bw)) for n, f, bw in GPU_PEAKS)["H100"]
    assert h100 == ({"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494.5e12}, 3.35e12)
