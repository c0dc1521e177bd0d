"""Side by side: a Markdown table of results and PNG charts (matplotlib, the `charts` extra).

The table has one row per metric (all 18, in registry order, with units) and one column per result,
headed by what was run (backend, precision, scenario, batch size) and LoadGen's verdict; `markdown_rows`
transposes it (one row per result) for many results. Charts:

  latency_distribution.png  the per-request latency CDF of every result
  throughput_vs_batch.png   tokens/s against batch size (Offline runs), one line per model / backend / precision
  accuracy_vs_size.png      accuracy and perplexity against weight bytes
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

from ds_bench.errors import BenchError
from ds_bench.metrics import METRICS
from ds_bench.result import metric_value, records


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return " / ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return str(value)
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{value:.3g}"
    if a >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if a < 1 else f"{value:.2f}"


def precision(result: dict) -> str:
    return result["model"].get("quant") or result["model"].get("dtype") or "?"


def column_title(result: dict) -> str:
    return result["label"]


def markdown_table(results: list[dict]) -> str:
    head = ["metric", "unit", *(column_title(r).replace("|", "/") for r in results)]
    rows = [
        ["backend", "", *(r["backend"]["name"] for r in results)],
        ["precision", "", *(precision(r) for r in results)],
        ["scenario", "", *(r["scenario"] for r in results)],
        ["batch size", "", *(str(r["settings"].get("batch_size", "")) for r in results)],
        ["device", "", *(r["device"].get("name", r["device"].get("type", "?")) for r in results)],
        [
            "LoadGen",
            "",
            *(
                r["loadgen"]["result"] if r.get("loadgen") else ("VALID" if r["valid"] else "INVALID")
                for r in results
            ),
        ],
    ]
    for name, m in METRICS.items():
        rows.append([name, m.unit, *(_fmt(metric_value(r, name)) for r in results)])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = sorted({f"{name}: {r['metrics'][name]['unavailable']}" for r in results for name in METRICS
                    if r["metrics"].get(name, {}).get("unavailable")})  # fmt: skip
    if notes:
        lines.append("")
        lines += [f"- n/a {note}" for note in notes]
    return "\n".join(lines)


# One row per result: what was run, LoadGen's verdict, then every metric (the two-part ones split).
_ROW_COLUMNS: list[tuple[str, str, str | None]] = [
    ("acc %", "accuracy", None), ("Δacc pp", "accuracy_delta", None), ("ppl", "perplexity", None),
    ("p50 ms", "latency_p50", None), ("p90 ms", "latency_p90", None), ("p99 ms", "latency_p99", None),
    ("TTFT ms", "ttft", None), ("TPOT ms", "tpot", None), ("ITL p99 ms", "itl_p99", None),
    ("samples/s", "samples_per_s", None), ("tok/s", "tokens_per_s", None), ("goodput/s", "goodput", None),
    ("J/sample", "energy_per_sample", None), ("samples/J", "samples_per_joule", None), ("W", "average_power", None),
    ("host MiB", "peak_memory", "host"), ("dev MiB", "peak_memory", "device"), ("load s", "load_time", None),
    ("MFU pre %", "hardware_utilisation", "mfu_prefill"), ("MBU dec %", "hardware_utilisation", "mbu_decode"),
]  # fmt: skip


def markdown_rows(results: list[dict]) -> str:
    """The same numbers transposed: one row per result, one column per metric (for many results)."""
    head = ["model", "backend", "precision", "scenario", "bs", "LoadGen", *(c[0] for c in _ROW_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            Path(r["model"]["dir"]).name, r["backend"]["name"], precision(r), r["scenario"],
            str(r["settings"].get("batch_size", "")),
            r["loadgen"]["result"] if r.get("loadgen") else ("VALID" if r["valid"] else "INVALID"),
        ]  # fmt: skip
        for _, name, part in _ROW_COLUMNS:
            value = metric_value(r, name)
            if part is not None:
                value = (value or {}).get(part)
            cells.append(_fmt(value))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


# ---- charts ---------------------------------------------------------------------------------------


def _pyplot():
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--charts: needs matplotlib: pip install 'ds-bench[charts]'")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams["axes.prop_cycle"] = cycler(color=plt.cm.tab20.colors)  # 20 configurations tell apart
    return plt


def write_charts(results: list[dict], out_dir: str | Path) -> list[Path]:
    """Write the charts the results have data for; return their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # Latency distribution: empirical CDF of completion - arrival.
    fig, ax = plt.subplots(figsize=(10, 4.6))
    drawn = 0
    for r in results:
        lat = sorted(1e3 * q.latency for q in records(r))
        if lat:
            ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=column_title(r))
            drawn += 1
    if drawn:
        ax.set_xscale("log")
        ax.set_xlabel("latency per request (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("Latency distribution")
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        written.append(_save(fig, out_dir / "latency_distribution.png"))
    plt.close(fig)

    # Throughput vs batch size (Offline runs: the scenario that measures capacity), per model /
    # backend / precision / device.
    groups: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        tps = metric_value(r, "tokens_per_s")
        if tps is not None and r["scenario"] == "offline":
            key = f"{Path(r['model']['dir']).name} {r['backend']['name']} {precision(r)} ({r['device'].get('type')})"
            groups[key].append((int(r["settings"]["batch_size"]), float(tps)))
    if groups:
        fig, ax = plt.subplots(figsize=(10, 4.6))
        for key, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("output tokens/s (log scale)")
        ax.set_title("Throughput vs batch size")
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        written.append(_save(fig, out_dir / "throughput_vs_batch.png"))
        plt.close(fig)

    # Accuracy and perplexity vs size on disk / in memory.
    pts = [(r["model"]["weight_bytes"] / 2**20, metric_value(r, "accuracy"), metric_value(r, "perplexity"), r)
           for r in results if r["model"].get("weight_bytes")]  # fmt: skip
    pts = [p for p in pts if p[1] is not None or p[2] is not None]
    if pts:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
        seen = set()
        for size, acc, ppl, r in pts:
            name = f"{Path(r['model']['dir']).name} {r['backend']['name']} {precision(r)}"
            if name in seen:  # one point per model/precision (scenarios repeat the same accuracy)
                continue
            seen.add(name)
            if acc is not None:
                ax1.scatter(size, acc, label=name)
            if ppl is not None:
                ax2.scatter(size, ppl, label=name)
        for ax, what in ((ax1, "next-token accuracy (%)"), (ax2, "perplexity")):
            ax.set_xscale("log")
            ax.set_xlabel("weight bytes (MiB, log scale)")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        ax2.set_yscale("log")
        _legend_outside(ax2)
        fig.suptitle("Accuracy vs size")
        written.append(_save(fig, out_dir / "accuracy_vs_size.png"))
        plt.close(fig)
    return written


def _legend_outside(ax) -> None:
    # Right of the plot, not over it: a suite has 20+ configurations.
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _save(fig, path: Path) -> Path:
    import os

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path
