"""Task plugins: what the trainer trains when it is not the built-in language model.

ds-trainer owns the loop (accelerate, micro-batches and gradient accumulation, optimizer, schedule,
precision, clipping, checkpoints and exact resume, metrics, progress bar, provenance); a task owns
its model, its data and its loss. A config picks one with ``task: NAME`` and passes it
``task_options: {...}``; ``task: lm`` (the default) is the built-in language-model path.

Tasks are found, in this order, among those registered in this process (``register_task``), the
entry points of the group ``ds_trainer.tasks`` that installed packages declare::

    [project.entry-points."ds_trainer.tasks"]
    align = "ds_multimodal.task:AlignTask"

and, for scripts and tests, a ``"package.module:ClassName"`` spec (which torchrun's child
processes can import too, where an in-process registration does not travel).

How the trainer drives a task (``TaskWorkload`` below): the data position, micro-batch split and
loss normalisation are the trainer's. Each micro-batch's mean loss is weighted by its number of
examples, so the loss of an optimizer step is the mean over every example of the accumulation
window on all processes, whatever the split; that is what lets a 2-process run match a 1-process
run at the same global batch.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import shutil
import tempfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ds_trainer.errors import TrainerError

if TYPE_CHECKING:
    from ds_trainer.config import TrainConfig

ENTRY_POINT_GROUP = "ds_trainer.tasks"
BUILTIN = "lm"
TASK_FILE = "task.json"  # written by Task.save_model's default: which task and options made the model

_REGISTRY: dict[str, type[Task]] = {}


class Task:
    """Base class of a task plugin. Subclasses set ``name`` and implement ``build_model``,
    ``build_datasets`` and ``loss``; the rest has working defaults."""

    name: str = ""
    # Class names of the submodules FSDP shards as one unit each (e.g. ["Block"]); empty = the
    # whole model is one unit.
    fsdp_units: tuple[str, ...] = ()

    def __init__(self, options: dict, cfg: TrainConfig) -> None:
        """Validate ``options`` here; raise TrainerError naming ``task_options.<field>``
        (``read_options`` does the common checks)."""
        self.options = dict(options)
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        """A fresh model (the trainer seeds, moves and wraps it)."""
        raise NotImplementedError(f"task {self.name}: build_model")

    def build_datasets(self) -> tuple[Any, Any | None]:
        """(train, eval) map-style datasets (``len`` and ``[i]``); eval may be None."""
        raise NotImplementedError(f"task {self.name}: build_datasets")

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        """Items of the dataset -> one batch dict of tensors (first dimension = examples)."""
        return torch.utils.data.default_collate(items)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss over the micro-batch, named terms such as {"loss/text_image": 0.7}).

        ``model`` is the model as the trainer wrapped it (DDP, FSDP): call it (``model(...)``)
        so that gradients synchronise; the batch is already on the model's device."""
        raise NotImplementedError(f"task {self.name}: loss")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]:
        """Metrics on the eval split; "loss" (if present) drives early stopping. Default: the
        example-weighted mean of ``loss`` and its named terms, in micro-batches."""
        device = next(model.parameters()).device
        size = self.cfg.data.micro_batch_size
        total: dict[str, float] = {}
        n = 0
        for lo in range(0, len(dataset), size):
            batch = to_device(
                self.collate([dataset[i] for i in range(lo, min(lo + size, len(dataset)))]), device
            )
            k = batch_size(batch)
            loss, terms = self.loss(model, batch)
            for key, value in {"loss": loss, **terms}.items():
                total[key] = total.get(key, 0.0) + float(value) * k
            n += k
        return {key: value / max(1, n) for key, value in total.items()}

    def save_model(self, model: nn.Module, directory: Path) -> None:
        """Write the model's files into ``directory`` (a fresh temp directory; the trainer renames
        it into place and adds provenance.json). Default: ``model.safetensors`` plus
        ``task.json`` (task name and options), which the default ``load_model`` reads back."""
        from safetensors.torch import save_model

        save_model(model, str(Path(directory) / "model.safetensors"))
        spec = {
            "task": self.name or f"{type(self).__module__}:{type(self).__qualname__}",
            "options": self.options,
        }
        (Path(directory) / TASK_FILE).write_text(json.dumps(spec, indent=2) + "\n")

    @classmethod
    def load_model(cls, directory: str | os.PathLike) -> nn.Module:
        """A model from a directory that ``save_model`` wrote (resume, and users loading it)."""
        from safetensors.torch import load_model

        from ds_trainer.config import TrainConfig

        directory = Path(directory)
        spec_path = directory / TASK_FILE
        if not spec_path.is_file():
            raise TrainerError(
                f"{spec_path}: missing (not a model directory of task {cls.name or cls.__name__})"
            )
        spec = json.loads(spec_path.read_text())
        task = cls(spec["options"], TrainConfig(task=spec["task"], task_options=spec["options"]))
        with torch.random.fork_rng(devices=[]):  # loading must not move the caller's random stream
            model = task.build_model()
        load_model(model, str(directory / "model.safetensors"))
        return model

    # --- helpers for subclasses -----------------------------------------------------------------

    def read_options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """``self.options`` over ``defaults``: unknown keys fail with a "did you mean", values must
        have the default's type (an int is accepted for a float)."""
        out = dict(defaults)
        for key, value in self.options.items():
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=1)
                hint = (
                    f" (did you mean '{close[0]}'?)" if close else f" (expected one of {', '.join(defaults)})"
                )
                raise TrainerError(f"task_options.{key}: unknown option of task {self.name}{hint}")
            want = type(defaults[key])
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if defaults[key] is not None and not ok:
                raise TrainerError(f"task_options.{key}: expected {want.__name__}, got {value!r}")
            out[key] = value
        return out


def register_task(name: str, cls: type[Task]) -> None:
    """Make ``task: NAME`` train ``cls`` in this process (tests, notebooks)."""
    if name == BUILTIN:
        raise TrainerError(f"task: {name!r} is the built-in language-model task and cannot be replaced")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(
            f"register_task({name!r}, ...): expected a subclass of ds_trainer.tasks.Task, got {cls!r}"
        )
    _REGISTRY[name] = cls


def task_names() -> list[str]:
    """Every task name known here: the built-in, registered ones and installed entry points."""
    names = [BUILTIN, *_REGISTRY]
    names += [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in names]
    return names


def registered_in_process_only(name: str) -> bool:
    """True for a name that only ``register_task`` knows (torchrun's children will not)."""
    return name in _REGISTRY and not any(ep.name == name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_task_class(name: str) -> type[Task]:
    """The Task class for ``task: NAME``; unknown names fail with a "did you mean"."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                cls = ep.load()
            except Exception as e:
                raise TrainerError(
                    f"task: {name}: cannot load entry point {ep.value} ({type(e).__name__}: {e})"
                ) from None
            return _checked(name, cls)
    if ":" in name:
        module, _, qualname = name.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise TrainerError(f"task: {name}: cannot import ({type(e).__name__}: {e})") from None
        return _checked(name, obj)
    known = task_names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise TrainerError(f"task: {name!r}: unknown task ({hint}known: {', '.join(known)})")


def _checked(name: str, cls: Any) -> type[Task]:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TrainerError(f"task: {name}: {cls!r} is not a subclass of ds_trainer.tasks.Task")
    return cls


def build_task(cfg: TrainConfig) -> Task:
    """The configured task; option errors a task raises as ValueError become TrainerErrors."""
    cls = load_task_class(cfg.task)
    try:
        task = cls(dict(cfg.task_options), cfg)
    except TrainerError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise TrainerError(msg if msg.startswith("task_options") else f"task_options: {msg}") from None
    if not task.name:
        task.name = cfg.task
    return task


# --- how the loop drives a task ------------------------------------------------------------------


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        if isinstance(v, (torch.Tensor, dict, list, tuple)):
            return batch_size(v)
    raise TrainerError("task: collate must return a dict of tensors (first dimension = examples)")


def _describe(dataset) -> str | None:
    if dataset is None:
        return None
    if hasattr(dataset, "_fingerprint"):  # a datasets.Dataset: its content fingerprint
        import ds_data

        return ds_data.fingerprint(dataset)
    return f"{type(dataset).__name__} of {len(dataset)} items"


class TaskWorkload:
    """A Task seen through the interface the run uses for every workload (see run.py)."""

    unit = "examples"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.task = build_task(cfg)
        self.name = self.task.name
        self.parent = f"task {self.name} (fresh weights)"
        self.teacher = None
        self.lora_stats = None
        self.fsdp_units = list(self.task.fsdp_units)

    def build_model(self, resume_dir: Path | None) -> nn.Module:
        if resume_dir is not None:
            return type(self.task).load_model(resume_dir / "model").train()
        model = self.task.build_model()
        if not isinstance(model, nn.Module):
            raise TrainerError(
                f"task {self.name}: build_model returned {type(model).__name__}, not an nn.Module"
            )
        return model.train()

    def build_data(self, accelerator, output_dir: Path, model: nn.Module) -> None:
        with accelerator.main_process_first():
            self.train, self.eval = self.task.build_datasets()
        if self.train is None or len(self.train) == 0:
            raise TrainerError(f"task {self.name}: build_datasets returned an empty training set")
        self.fingerprints = {"task": self.name, "train": _describe(self.train), "eval": _describe(self.eval)}

    def batch(self, indices: list[int]) -> Any:
        return self.task.collate([self.train[i] for i in indices])

    def weight(self, batch: Any) -> int:
        return batch_size(batch)

    def loss_sum(self, model: nn.Module, batch: Any, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss and terms times its example count (normalised by the run)."""
        batch = to_device(batch, run.device)
        n = batch_size(batch)
        with run.accelerator.autocast():
            loss, terms = self.task.loss(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TrainerError(f"task {self.name}: loss must return a scalar tensor, got {loss!r}")
        return loss.float() * n, {
            k: torch.as_tensor(float(v) * n, device=run.device) for k, v in terms.items()
        }

    def evaluate(self, model: nn.Module, run) -> dict[str, float] | None:
        if self.eval is None or len(self.eval) == 0:
            return None
        model.eval()
        try:
            with torch.no_grad(), run.accelerator.autocast():
                metrics = self.task.evaluate(model, self.eval)
        finally:
            model.train()
        return {k: float(v) for k, v in metrics.items()}

    def write_model_dir(
        self, directory: Path, state: dict[str, torch.Tensor], provenance: dict, live: nn.Module | None
    ) -> None:
        """Main process: the task's files in a temp directory, provenance added, renamed into place.
        ``live`` is the trained model when this process holds all of it; sharded runs pass None and
        the gathered ``state`` goes into a fresh copy, built without touching the random stream."""
        from ds_models import write_provenance

        if live is None:
            with torch.random.fork_rng(devices=[]):
                live = self.task.build_model()
            live.load_state_dict(state)
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            self.task.save_model(live, tmp)
            write_provenance(tmp, **provenance)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_checkpoint_extras(self, tmp: Path, state: dict[str, torch.Tensor]) -> None:
        pass
