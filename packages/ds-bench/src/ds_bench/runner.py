"""One benchmark run, top to bottom: load, calibrate, LoadGen scenario, accuracy pass, metrics, result.

cold start     load the model and generate one token: `load_time` (load to first output)
workload       prompts of `prompt_len` tokens: windows of the evaluation text when given,
               else seeded random token ids; `samples` of them form LoadGen's sample library
calibration    repeated single requests and full batches after a warm-up; they size LoadGen's
               settings that were not given: the best run the expected latency / QPS hints (LoadGen
               then errs towards more work), the medians the Server rate and targets (the speed the
               system typically has, so the targets are met by design, not by luck)
scenario       the LoadGen run (scenarios.py) inside the energy and memory measurement window
accuracy       next-token accuracy and perplexity over `eval_tokens` tokens, outside the window
metrics        metrics.compute over the records and counters; everything lands in one result
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ds_bench import hardware
from ds_bench.backends import Backend, OnStep, make_backend, now
from ds_bench.energy import EnergySampler, open_meter
from ds_bench.errors import BenchError
from ds_bench.metrics import Counters, LatencyTargets, Unavailable, compute
from ds_bench.result import (
    FORMAT,
    FORMAT_VERSION,
    library_versions,
    load_result,
    metric_entries,
    requests_entry,
)
from ds_bench.scenarios import ScenarioSettings, run_scenario

MAX_ATTEMPTS = 3  # LoadGen runs per `run` when one ends before min_duration (offline, singlestream)
SERVER_LOAD = 0.35  # default Server rate, as a fraction of 1 / (median single-request latency)


@dataclass
class RunConfig:
    """Every knob of `ds-bench run` (the CLI maps flags, a YAML file and key=value onto this)."""

    model: str = ""
    backend: str = "torch"
    scenario: str = "offline"
    device: str = "cpu"
    dtype: str | None = None  # fp32 | bf16 | fp16; default fp32 on CPU, bf16 on CUDA
    threads: int | None = None  # CPU threads of torch / onnxruntime; None: the library default
    seed: int = 0
    label: str | None = None
    # workload
    samples: int = 32  # distinct prompts in LoadGen's sample library
    prompt_len: int = 32
    gen_tokens: int = 16
    batch_size: int = 8
    # LoadGen (seconds); None = sized from the calibration run
    min_duration: float = 1.0
    max_duration: float = 300.0
    min_query_count: int | None = None  # None: what LoadGen's early stopping needs (scenarios.py)
    latency_percentile: float = 0.9
    target_qps: float | None = None
    target_latency_ms: float | None = None
    target_ttft_ms: float | None = None
    target_tpot_ms: float | None = None
    # accuracy pass
    eval_data: str | None = None  # .txt or .jsonl ("text" field), tokenized with the model's tokenizer.json
    eval_tokens: int = 2048
    eval_seq_len: int = 128
    reference: str | None = None  # a result file whose accuracy `accuracy_delta` is measured against
    # where LoadGen writes its logs (default: a directory beside the result file)
    log_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, copied into the result

    def __post_init__(self) -> None:
        if not self.model:
            raise BenchError("--model: required (a ds model directory)")
        for name in ("samples", "prompt_len", "gen_tokens", "batch_size", "eval_tokens", "eval_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BenchError(f"--{name.replace('_', '-')}: expected a positive integer, got {v!r}")
        if self.eval_seq_len < 2:
            raise BenchError(f"--eval-seq-len: expected at least 2, got {self.eval_seq_len}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise BenchError(f"--device: expected cpu or cuda[:N], got {self.device!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BenchError(
                f"{where}: {unknown[0]}: unknown setting; expected some of {', '.join(sorted(known))}"
            )
        return cls(**d)


# ---- workload -------------------------------------------------------------------------------------


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise BenchError(f"--eval-data: {path}: no such file")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BenchError(f"{path}: line {i}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise BenchError(f"{path}: line {i}: text: expected a string field")
            texts.append(row["text"])
        return texts
    raise BenchError(f"--eval-data: {path}: expected a .txt or .jsonl file")


def token_stream(cfg: RunConfig, model_dir: Path, vocab_size: int, n_tokens: int) -> tuple[np.ndarray, str]:
    """(token ids, where they came from): the evaluation text tokenized, or seeded random ids."""
    if cfg.eval_data is None:
        rng = np.random.default_rng(cfg.seed)
        return rng.integers(
            0, vocab_size, size=n_tokens, dtype=np.int64
        ), f"random token ids (seed {cfg.seed})"
    from ds_models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise BenchError(f"--eval-data: {model_dir}: has no tokenizer.json to tokenize {cfg.eval_data}")
    ids: list[int] = []
    for text in read_texts(Path(cfg.eval_data)):
        ids.extend(tokenizer.encode(text).ids)
        if len(ids) >= n_tokens:
            break
    if len(ids) < 2:
        raise BenchError(f"--eval-data: {cfg.eval_data}: tokenizes to fewer than 2 tokens")
    return np.asarray(ids[:n_tokens], dtype=np.int64), str(cfg.eval_data)


def make_prompts(stream: np.ndarray, samples: int, prompt_len: int) -> list[list[int]]:
    """`samples` windows of `prompt_len` tokens, consecutive through the stream (wrapping around)."""
    reps = math.ceil(samples * prompt_len / len(stream))
    flat = np.tile(stream, reps)
    return [flat[i * prompt_len : (i + 1) * prompt_len].tolist() for i in range(samples)]


# ---- measured generation --------------------------------------------------------------------------


class PhaseMeter(Backend):
    """Wraps a backend: adds up prefill / decode time, FLOPs and bytes from the step timestamps."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.facts = inner.facts
        self.reset()

    def reset(self) -> None:
        self.prefill_seconds = self.decode_seconds = 0.0
        self.prefill_flops = self.decode_bytes = 0.0

    def load(self, model_dir: Path) -> None:  # pragma: no cover - wrapped backends are loaded
        self.inner.load(model_dir)

    def generate(self, prompts, max_new_tokens, on_step: OnStep) -> None:
        B, T = len(prompts), len(prompts[0])
        last = [now()]

        def step(i: int, tokens: list[int], t: float) -> None:
            if i == 0:
                self.prefill_seconds += t - last[0]
                self.prefill_flops += self.facts.prefill_flops(B, T)
            else:
                self.decode_seconds += t - last[0]
                self.decode_bytes += self.facts.decode_bytes(B, T + i)
            last[0] = t
            on_step(i, tokens, t)

        self.inner.generate(prompts, max_new_tokens, step)

    def logits(self, ids):
        return self.inner.logits(ids)


def _timed_generate(backend: Backend, prompts, n: int) -> tuple[float, float, float]:
    """(total seconds, prefill seconds, mean decode step seconds) of one generate call."""
    times: list[float] = []
    start = now()
    backend.generate(prompts, n, lambda i, tok, t: times.append(t))
    total = now() - start
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    return total, times[0] - start, tpot


def _repeat(measure, seconds: float = 0.5, at_least: int = 3) -> tuple[tuple, tuple]:
    """(best, median) of repeated measurements of (total, prefill, step) tuples: the best is the run
    with the smallest total; the median is taken per component (a run whose prefill stalled must not
    lend its quick decode steps to the median step time)."""
    runs = []
    end = now() + seconds
    while len(runs) < at_least or now() < end:
        runs.append(measure())
    median = tuple(float(np.median([r[i] for r in runs])) for i in range(len(runs[0])))
    return min(runs), median


def score(backend: Backend, stream: np.ndarray, seq_len: int, progress=None) -> dict[str, float | int]:
    """Next-token accuracy and summed NLL over consecutive windows of the token stream."""
    import torch

    correct = predicted = 0
    nll = 0.0
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    for w in progress(windows, "accuracy") if progress else windows:
        logits = torch.from_numpy(
            np.ascontiguousarray(backend.logits(w.tolist()), dtype=np.float32)
        )  # (T, V)
        targets = torch.from_numpy(w[1:])
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll += float(-logp.gather(1, targets[:, None]).sum())
        correct += int((logits[:-1].argmax(-1) == targets).sum())
        predicted += len(targets)
    return {"correct": correct, "predicted": predicted, "nll_sum": nll, "nll_tokens": predicted}


# ---- the run --------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: RunConfig, *, log_dir: str | Path | None = None, progress=None, say=None) -> dict:
    """Run one benchmark and return the result document (see result.py)."""
    say = say or (lambda msg: None)
    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise BenchError(f"--model: {model_dir}: not a directory")
    reference_accuracy = None
    if cfg.reference:
        ref = load_result(cfg.reference)
        reference_accuracy = (ref["metrics"].get("accuracy") or {}).get("value")
        if reference_accuracy is None:
            raise BenchError(f"--reference: {cfg.reference}: has no accuracy value")
        ref_eval = ref.get("eval", {}).get("source")
    backend = make_backend(cfg.backend, cfg.device, cfg.dtype, cfg.threads)
    settings = ScenarioSettings(
        cfg.scenario, gen_tokens=cfg.gen_tokens, batch_size=cfg.batch_size, min_duration=cfg.min_duration,
        max_duration=cfg.max_duration, min_query_count=cfg.min_query_count,
        latency_percentile=cfg.latency_percentile, target_qps=cfg.target_qps, seed=cfg.seed,
    )  # fmt: skip
    _seed_everything(cfg.seed)

    # Cold start: loading to the first generated token, in a fresh measurement of host memory.
    say(f"loading {model_dir} with the {cfg.backend} backend")
    hardware.reset_host_peak()
    t0 = now()
    backend.load(model_dir)
    first: list[float] = []
    backend.generate([[0] * min(cfg.prompt_len, 8)], 1, lambda i, tok, t: first.append(t))
    load_to_first_output = first[0] - t0

    stream, source = token_stream(
        cfg, model_dir, backend.facts.vocab_size, max(cfg.eval_tokens, cfg.prompt_len)
    )
    if cfg.reference and ref_eval != source:
        raise BenchError(f"--reference: {cfg.reference}: evaluated on {ref_eval!r}, this run on {source!r}")
    prompts = make_prompts(stream, cfg.samples, cfg.prompt_len)

    # Calibration (and warm-up): a request alone and a full batch, repeated for at least half a second
    # each (three times at least), after a warm-up batch (first calls pay for allocation and, on the
    # fast path, compilation).
    say("calibrating")
    bs = min(cfg.batch_size, cfg.samples)
    backend.generate(prompts[:bs], cfg.gen_tokens, lambda *a: None)
    single_best, single_med = _repeat(lambda: _timed_generate(backend, prompts[:1], cfg.gen_tokens))
    batch_best, batch_med = _repeat(lambda: _timed_generate(backend, prompts[:bs], cfg.gen_tokens))
    single, typical = single_best[0], single_med[0]
    throughput = bs / batch_best[0]
    # LoadGen sizes its runs from these hints and marks a run INVALID that ends before min_duration,
    # so err towards more work: the best speed, half the latency, twice the throughput.
    settings.expected_latency = 0.5 * single
    settings.expected_qps = 2.0 * throughput
    # Server: rate and targets from the median (typical) speed, so that LoadGen's verdict says whether
    # the system meets them, not whether the calibration happened to catch its best moment.
    if settings.target_qps is None:
        # Poisson arrivals at SERVER_LOAD x what serving one request at a time sustains. Served alone
        # (batch 1) this is an M/D/1 queue at utilisation 0.35: a request waits longer than 4 service
        # times with probability 0.03 % (1 % if requests ran 60 % slower than calibrated: utilisation
        # 0.57), so the TTFT target below is missed rarely; batching (batch_size > 1) adds headroom.
        settings.target_qps = round(SERVER_LOAD / typical, 3)
    # Targets: a request may wait for the batch in progress, then run in the next one (2 batch times);
    # the margin on top covers the queueing tail above and a loaded machine. TPOT: a full batch's
    # step time, 4x. Goodput uses the same targets.
    batch_total, batch_tpot = batch_med[0], batch_med[2]
    settings.ttft_target = cfg.target_ttft_ms / 1e3 if cfg.target_ttft_ms else 5.0 * batch_total
    settings.tpot_target = cfg.target_tpot_ms / 1e3 if cfg.target_tpot_ms else max(4.0 * batch_tpot, 1e-3)
    settings.target_latency = cfg.target_latency_ms / 1e3 if cfg.target_latency_ms else 8.0 * batch_total
    calibration = {
        "single_request_s": single, "single_request_median_s": typical,
        "batch_s": batch_best[0], "batch_median_s": batch_total, "batch_prefill_s": batch_med[1],
        "batch_tpot_s": batch_tpot, "batch_size": bs, "samples_per_s": throughput,
    }  # fmt: skip

    # The measured run: LoadGen drives, energy and memory are read around it.
    metered = PhaseMeter(backend)
    meter = open_meter(cfg.device)
    log_dir = log_dir or cfg.log_dir or tempfile.mkdtemp(prefix="ds-bench-loadgen-")

    def measure():
        metered.reset()
        sampler = EnergySampler(meter)
        hardware.reset_host_peak()
        hardware.reset_device_peak(cfg.device)
        sampler.start()
        out = run_scenario(metered, prompts, settings, log_dir)
        return out, sampler.stop(), hardware.host_peak_bytes(), hardware.device_peak_bytes(cfg.device)

    say(f"LoadGen {cfg.scenario} (min {cfg.min_duration:g} s)")
    out, energy, peak_host, peak_device = measure()
    attempts = 1
    while (
        not out.valid
        and out.loadgen["detail"].get("result_min_duration_met") is False
        and cfg.scenario != "server"
        and attempts < MAX_ATTEMPTS
    ):
        # The calibration underestimated the speed (a busy machine calibrates slow): LoadGen issued too
        # little work to fill min_duration. Size it from the speed LoadGen just measured, and rerun.
        speed = len(out.records) / max(out.window, 1e-9)
        settings.expected_qps = 3.0 * max(speed, settings.expected_qps or 0.0)
        settings.expected_latency = min(1.0 / (3.0 * max(speed, 1e-9)), settings.expected_latency or 1.0)
        say(f"LoadGen {cfg.scenario}: run shorter than min_duration; again, sized for {speed:.3g} samples/s")
        out, energy, peak_host, peak_device = measure()
        attempts += 1

    say("accuracy pass")
    tallies = score(backend, stream[: cfg.eval_tokens], cfg.eval_seq_len, progress)
    peaks = hardware.device_peaks(cfg.device, backend.dtype)

    if cfg.target_latency_ms or cfg.target_ttft_ms or cfg.target_tpot_ms:
        targets = LatencyTargets(
            latency=cfg.target_latency_ms / 1e3 if cfg.target_latency_ms else None,
            ttft=cfg.target_ttft_ms / 1e3 if cfg.target_ttft_ms else None,
            tpot=cfg.target_tpot_ms / 1e3 if cfg.target_tpot_ms else None,
        )
    elif cfg.scenario == "server":  # the targets LoadGen judged the run by
        targets = (
            LatencyTargets(ttft=settings.ttft_target, tpot=settings.tpot_target)
            if settings.token_latencies
            else LatencyTargets(latency=settings.target_latency)
        )
    else:
        targets = LatencyTargets()
    counters = Counters(
        correct=int(tallies["correct"]), predicted=int(tallies["predicted"]), reference_accuracy=reference_accuracy,
        nll_sum=float(tallies["nll_sum"]), nll_tokens=int(tallies["nll_tokens"]),
        energy_j=energy, energy_window=out.window,
        peak_host_bytes=peak_host, peak_device_bytes=peak_device, load_to_first_output=load_to_first_output,
        prefill_flops=metered.prefill_flops, prefill_seconds=metered.prefill_seconds,
        decode_bytes=metered.decode_bytes, decode_seconds=metered.decode_seconds,
        peak_flops=peaks.flops, peak_bytes_per_s=peaks.bytes_per_s, peak_source=peaks.source, targets=targets,
    )  # fmt: skip
    values = compute(out.records, counters)
    facts = backend.facts
    model_info = {
        "dir": str(model_dir), "params": facts.params, "weight_bytes": facts.matmul_weight_bytes,
        "dtype": facts.dtype, "quant": facts.quant, "vocab_size": facts.vocab_size, "n_layers": facts.n_layers,
    }  # fmt: skip
    provenance = model_dir / "provenance.json"
    if provenance.exists():
        try:
            model_info["provenance"] = json.loads(provenance.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            model_info["provenance"] = "unreadable"
    label = (
        cfg.label
        or f"{model_dir.name} {cfg.backend} {facts.quant or facts.dtype} {cfg.scenario} bs{cfg.batch_size}"
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "model": model_info,
        "backend": backend.describe(),
        "scenario": cfg.scenario,
        "device": hardware.describe_device(cfg.device),
        "versions": library_versions(),
        "seed": cfg.seed,
        "settings": dataclasses.asdict(cfg),
        "calibration": calibration,
        "eval": {"source": source, "tokens": int(tallies["predicted"]), "seq_len": cfg.eval_seq_len},
        "energy": {"meter": meter.describe() if not isinstance(meter, Unavailable) else meter.reason},
        "peaks": {"flops": peaks.flops, "bytes_per_s": peaks.bytes_per_s, "source": peaks.source},
        "targets": dataclasses.asdict(targets),
        "valid": out.valid,
        "loadgen": {**out.loadgen, "attempts": attempts},
        "metrics": metric_entries(values),
        "requests": requests_entry(out.records),
    }
