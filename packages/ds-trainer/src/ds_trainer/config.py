"""TrainConfig: one small dataclass per component, loaded from YAML plus ``key=value`` overrides.

Like torchtitan's job config, each component owns its knobs (``optim.lr``, ``data.seq_len``,
``checkpoint.keep_last``...). The YAML file mirrors the dataclasses one-to-one, so the CLI never
invents flags: ``ds-train small.yaml optim.lr=1e-3 data.micro_batch_size=4``.

Every key is checked: an unknown key fails with a "did you mean" (difflib), a value of the wrong
type fails naming the key and the expected type, a value out of range fails in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ds_trainer.errors import TrainerError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: "1e-3" is a float and "2:4" (an elastic node range) a string, where
    PyYAML's YAML 1.1 rules read a string and the base-60 integer 124."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$|^0x[0-9a-fA-F]+$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise TrainerError(f"{section}.{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def _check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        want = ">= 0" if allow_zero else "> 0"
        raise TrainerError(f"{section}.{name}: expected a number {want}, got {value!r}")


@dataclass
class ModelSpec:
    """Which model to train."""

    # A registry name (fresh weights, e.g. "ds-tiny"), a model directory (its weights are the start),
    # or a ModelConfig YAML file (fresh weights).
    path: str = "ds-tiny"
    # ModelConfig fields changed for a fresh model, e.g. {n_layers: 2, max_seq_len: 256}.
    overrides: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise TrainerError("model.path: expected a registry name, model directory or config YAML")


@dataclass
class DataConfig:
    """Corpus -> tokenizer -> packed sequences, and how they are batched."""

    # "builtin" (ds-data's corpus) or .txt/.jsonl files.
    corpus: list[str] = field(default_factory=lambda: ["builtin"])
    # "auto": the model directory's tokenizer.json if it has one, else a byte-level BPE trained on
    # the corpus with the model's vocab size. Or a path to a tokenizer.json.
    tokenizer: str = "auto"
    seq_len: int = 128  # tokens the model sees per sequence (packed at seq_len + 1 for the shift)
    micro_batch_size: int = 8  # sequences per process per forward/backward
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_train_sequences: int = 0  # 0 = all
    max_eval_sequences: int = 64
    num_proc: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not self.corpus:
            raise TrainerError("data.corpus: expected 'builtin' or a list of .txt/.jsonl files, got []")
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "num_proc"):
            _check_positive("data", name, getattr(self, name))
        for name in ("max_train_sequences", "max_eval_sequences"):
            _check_positive("data", name, getattr(self, name), allow_zero=True)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    fused: str = "auto"  # "auto" (fused AdamW on CUDA), "yes", "no"
    clip_grad_norm: float = 1.0  # 0 = no clipping

    def __post_init__(self) -> None:
        _check_choice("optim", "name", self.name, ("adamw", "sgd"))
        _check_choice("optim", "fused", self.fused, ("auto", "yes", "no"))
        _check_positive("optim", "lr", self.lr)
        _check_positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optim", "clip_grad_norm", self.clip_grad_norm, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainerError(f"optim.betas: expected two numbers in [0, 1), got {self.betas!r}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule and training length (steps wins over epochs when both are set)."""

    name: str = "warmup-cosine"  # "warmup-cosine", "warmup-stable-decay", "constant"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # warmup-stable-decay: share of the steps spent decaying
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optim.lr
    steps: int = 0  # optimizer steps; 0 = derived from epochs
    epochs: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("schedule", "name", self.name, ("warmup-cosine", "warmup-stable-decay", "constant"))
        _check_positive("schedule", "warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("schedule", "steps", self.steps, allow_zero=True)
        _check_positive("schedule", "epochs", self.epochs)
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise TrainerError(
                f"schedule.decay_fraction: expected a number in [0, 1], got {self.decay_fraction!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainerError(
                f"schedule.min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}"
            )


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # "fp32", "bf16", "fp16" (GradScaler), "fp8" (Hopper/Ada GPUs)
    fp8_backend: str = "auto"  # "auto", "torchao", "te" (TransformerEngine)

    def __post_init__(self) -> None:
        _check_choice("precision", "dtype", self.dtype, ("fp32", "bf16", "fp16", "fp8"))
        _check_choice("precision", "fp8_backend", self.fp8_backend, ("auto", "torchao", "te"))


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 3
    resume: str = "auto"  # "auto": continue from the newest complete checkpoint in output_dir; "never"

    def __post_init__(self) -> None:
        _check_positive("checkpoint", "every", self.every, allow_zero=True)
        _check_positive("checkpoint", "keep_last", self.keep_last)
        _check_choice("checkpoint", "resume", self.resume, ("auto", "never"))


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # "ddp" or "fsdp"
    nodes: str = "1"  # "4", or an elastic range "2:8"
    gpus_per_node: int = 1  # processes per node (CPU processes on a machine without GPUs)
    rdzv_endpoint: str = "localhost:29500"  # HOST:PORT of the c10d rendezvous (multi-node)
    rdzv_id: str = "ds-train"
    max_restarts: int = 0  # torchrun restarts of the whole group (elastic)
    cpu: bool = False  # force CPU even where a GPU is present
    fsdp_reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        _check_choice("distributed", "strategy", self.strategy, ("ddp", "fsdp"))
        self.nodes = str(self.nodes)
        self.node_range()  # validates
        _check_positive("distributed", "gpus_per_node", self.gpus_per_node)
        _check_positive("distributed", "max_restarts", self.max_restarts, allow_zero=True)
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise TrainerError(f"distributed.rdzv_endpoint: expected HOST:PORT, got {self.rdzv_endpoint!r}")

    def node_range(self) -> tuple[int, int]:
        parts = self.nodes.split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
        except ValueError:
            lo = hi = 0
        if lo < 1 or hi < lo:
            raise TrainerError(
                f"distributed.nodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got {self.nodes!r}"
            )
        return lo, hi


@dataclass
class LoggingConfig:
    every: int = 1  # optimizer steps between metric records
    jsonl: bool = True  # output_dir/metrics.jsonl
    tensorboard: bool = False  # output_dir/tensorboard
    prometheus_port: int = 0  # 0 = off; each node serves /metrics on this port
    progress: bool = True

    def __post_init__(self) -> None:
        _check_positive("logging", "every", self.every)
        if not 0 <= self.prometheus_port < 65536:
            raise TrainerError(f"logging.prometheus_port: expected 0..65535, got {self.prometheus_port!r}")


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between evaluations; 0 = only at the end
    max_batches: int = 8
    patience: int = 0  # early stop after this many evaluations without improvement; 0 = never
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        for name in ("every", "patience"):
            _check_positive("eval", name, getattr(self, name), allow_zero=True)
        _check_positive("eval", "max_batches", self.max_batches)


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    merge: bool = True  # the final model directory holds merged, plain weights

    def __post_init__(self) -> None:
        _check_positive("lora", "r", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise TrainerError(f"lora.dropout: expected a number in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise TrainerError("lora.target_modules: expected at least one module name")


@dataclass
class DistillConfig:
    teacher: str = ""  # teacher model directory (or registry name); "" = no distillation
    temperature: float = 2.0
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy
    # Progressive chain: each stage trains {model, steps, overrides} with the previous stage's
    # result (the teacher for the first) as its teacher.
    stages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_positive("distill", "temperature", self.temperature)
        if not 0.0 <= self.alpha <= 1.0:
            raise TrainerError(f"distill.alpha: expected a number in [0, 1], got {self.alpha!r}")
        if self.stages and not self.teacher:
            raise TrainerError("distill.stages: a chain needs distill.teacher (the first teacher)")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, dict):
                raise TrainerError(f"distill.stages[{i}]: expected a mapping with model and steps")
            unknown = set(stage) - {"model", "steps", "overrides"}
            if unknown:
                raise TrainerError(
                    f"distill.stages[{i}]: unknown key {sorted(unknown)[0]!r} (expected model, steps, overrides)"
                )
            if not isinstance(stage.get("model"), str):
                raise TrainerError(f"distill.stages[{i}].model: expected a registry name, directory or YAML")
            if not isinstance(stage.get("steps"), int) or stage["steps"] <= 0:
                raise TrainerError(
                    f"distill.stages[{i}].steps: expected a positive int, got {stage.get('steps')!r}"
                )
            if not isinstance(stage.get("overrides", {}), dict):
                raise TrainerError(f"distill.stages[{i}].overrides: expected a mapping of ModelConfig fields")


@dataclass
class DPConfig:
    enabled: bool = False
    noise_multiplier: float = 1.0  # ignored when target_epsilon > 0
    target_epsilon: float = 0.0  # > 0: opacus picks the noise to spend this budget over the run
    max_grad_norm: float = 1.0  # per-sample clipping bound
    delta: float = 1e-5
    poisson_sampling: bool = True  # what the accountant assumes; off = fixed-size shuffled batches

    def __post_init__(self) -> None:
        _check_positive("dp", "noise_multiplier", self.noise_multiplier, allow_zero=True)
        _check_positive("dp", "target_epsilon", self.target_epsilon, allow_zero=True)
        _check_positive("dp", "max_grad_norm", self.max_grad_norm)
        if not 0.0 < self.delta < 1.0:
            raise TrainerError(f"dp.delta: expected a number in (0, 1), got {self.delta!r}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/ds-train"
    seed: int = 0
    # Stop (with a checkpoint) once this optimizer step is done; the schedule is unchanged, so a
    # resume continues the same run. 0 = run to the end.
    stop_after_steps: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    # What is trained: "lm" (a ds-models language model on a ds-data corpus) or a task plugin
    # (entry-point group "ds_trainer.tasks", ds_trainer.register_task, or "module:Class").
    task: str = "lm"
    task_options: dict = field(default_factory=dict)  # validated by the task; errors name task_options.<key>

    def __post_init__(self) -> None:
        _check_positive("", "stop_after_steps", self.stop_after_steps, allow_zero=True)
        if not self.task:
            raise TrainerError("task: expected a task name such as lm")
        if self.task != "lm":
            for key, on in (("lora.enabled", self.lora.enabled), ("distill.teacher", bool(self.distill.teacher)),
                            ("dp.enabled", self.dp.enabled)):  # fmt: skip
                if on:
                    raise TrainerError(f"{key}: only for task lm (task {self.task} trains its own model)")
        if self.dp.enabled and self.distributed.strategy == "fsdp":
            raise TrainerError("distributed.strategy: DP-SGD runs with ddp (opacus' DPDDP), not fsdp")
        if self.dp.enabled and self.lora.enabled:
            raise TrainerError("dp.enabled: DP-SGD together with lora.enabled is not supported; pick one")
        if self.dp.enabled and self.data.grad_accum_steps != 1:
            raise TrainerError("data.grad_accum_steps: DP-SGD needs 1 (opacus batches are the privacy unit)")

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> TrainConfig:
        return _build(cls, data or {}, source, prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise TrainerError(f"{path}: config file not found")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark is not None else "?"
            raise TrainerError(f"{path}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise TrainerError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
        try:
            cls.from_dict(data, source=str(path))  # blame the file for what is wrong in it...
        except TrainerError as e:
            msg = str(e)
            raise TrainerError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
        try:
            return cls.from_dict(apply_overrides(data, overrides or []), source=str(path))
        except TrainerError as e:  # ...and the override for what the overrides broke
            msg = str(e)
            key = msg.split(":", 1)[0]
            culprit = next((o for o in overrides or [] if o.split("=", 1)[0].strip() == key), None)
            raise TrainerError(f"override {culprit!r}: {msg}" if culprit else f"{path}: {msg}") from None

    @classmethod
    def from_overrides(cls, overrides: list[str], base: dict | None = None) -> TrainConfig:
        return cls.from_dict(apply_overrides(base or {}, overrides), source="overrides")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same directory, then os.replace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)
        os.replace(tmp, path)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with dotted keys changed, validated like an override: replace(**{"optim.lr": 1e-3})."""
        data = self.to_dict()
        for key, value in changes.items():
            _set_dotted(data, key.replace("__", "."), value)
        return TrainConfig.from_dict(data, source="replace")

    # Keys that may change between a run and its resume: they do not alter the training trajectory.
    # How the global batch is split (micro-batch x accumulation x processes) may change too, so that a
    # checkpoint written by N processes resumes on M (resharding, elastic restarts); the data position
    # is kept in sequences and the run logs when the global batch itself changed.
    RESUME_FREE = (
        "output_dir",
        "data.micro_batch_size",
        "data.grad_accum_steps",
        "stop_after_steps",
        "checkpoint",
        "logging",
        "distributed",
        "eval",
        "data.num_proc",
        "model.compile",
    )

    def trajectory_dict(self) -> dict:
        """The flattened keys that determine the training trajectory (compared on resume)."""
        flat = flatten(self.to_dict())
        return {
            k: v
            for k, v in flat.items()
            if not any(k == f or k.startswith(f + ".") for f in self.RESUME_FREE)
        }


# --- parsing helpers -----------------------------------------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key.count(".") < 1 and k not in ("overrides",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _did_you_mean(key: str) -> str:
    candidates = all_keys()
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a bare field name typed without its section: "lr" -> "optim.lr"
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=1, cutoff=0.75)
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == close[0]][:1] if close else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (values parsed as YAML) onto a nested dict (copied)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TrainerError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key, value)
    return data


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise TrainerError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise TrainerError(f"{full}: unknown key{_did_you_mean(full)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, source, full + ".")
        else:
            kwargs[key] = _coerce(value, hint, full)
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    if hint in (int, float, bool, str, dict):
        return hint.__name__
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return f"a list of {_type_name(inner)}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation; allow the lossless conversions YAML needs."""
    bad = TrainerError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # "nodes: 2", "path: 7" read as numbers
        raise bad
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is not dict:
            value = [value]  # "data.corpus=a.txt" means a one-element list
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except TrainerError:
                continue
        raise bad
    raise bad
