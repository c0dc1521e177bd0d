"""Atomic, keep-last-k training checkpoints.

Layout of ``OUTPUT_DIR/checkpoints/step_00000100/``::

    model/              a ds-models model directory (config.yaml, model.safetensors, provenance.json)
    adapter/            LoRA runs only: the peft adapter (safetensors) that training continues from
    optimizer.pt        optimizer state (tensors + plain values)
    trainer_state.pt    step, data position, scheduler, grad scaler, early stop, DP accountant
    rng.pt              python / numpy / torch / cuda RNG states of every rank
    train_config.yaml   the TrainConfig that wrote it (a resume compares against it)

A checkpoint is written into ``step_N.tmp-XXXX/`` and becomes ``step_N/`` by one ``os.replace``:
a reader never sees a half-written ``step_N/``. Older checkpoints are deleted only after the new
one has been renamed into place, so a crash at any point leaves the last complete one intact.
Everything that is not safetensors is loaded with ``torch.load(weights_only=True)``: a checkpoint
can hold tensors and plain values, never code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_trainer.config import TrainConfig
from ds_trainer.errors import TrainerError

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last: int = 3, is_main: bool = True):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (in-progress ``*.tmp-*`` directories are not)."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def remove_partial(self) -> list[Path]:
        """Delete leftovers of saves that were killed before their rename."""
        removed = []
        if self.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if ".tmp-" in p.name:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Main process: ``write(tmp_dir)`` fills a temp directory, which is then renamed to
        ``step_N``; after that, all but the newest ``keep_last`` checkpoints are deleted."""
        final = self.root / f"step_{step:08d}"
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=self.root))
        try:
            write(tmp)
            _fsync_tree(tmp)
            if final.exists():  # re-saving the same step (e.g. final save right after a cadence save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def find_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from; raises when it was written by a different config
    (compared on the keys that determine the trajectory, ``TrainConfig.trajectory_dict``)."""
    manager = CheckpointManager(Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.keep_last)
    latest = manager.latest()
    if latest is None:
        return None
    if cfg.checkpoint.resume == "never":
        raise TrainerError(
            f"checkpoint.resume: never, but {cfg.output_dir} holds checkpoints of an earlier run "
            "(use another output_dir or checkpoint.resume=auto)"
        )
    saved_path = latest / "train_config.yaml"
    saved = TrainConfig.from_yaml(saved_path)
    a, b = saved.trajectory_dict(), cfg.trajectory_dict()
    diff = [
        f"{k}: {a.get(k)!r} (checkpoint) != {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    if diff:
        raise TrainerError(f"{saved_path}: resume directory was written by a different config: {diff[0]}")
    return latest


def pause_point(step: int) -> None:
    """Test hook: with ``DS_TRAINER_PAUSE_IN_SAVE=STEP`` set, the save of that step stops halfway
    (after the model directory, before the optimizer state), touches ``DS_TRAINER_PAUSE_MARKER``
    and sleeps, so that a test can SIGKILL the process in the middle of a save."""
    want = os.environ.get("DS_TRAINER_PAUSE_IN_SAVE")
    if want and int(want) == step:
        marker = os.environ.get("DS_TRAINER_PAUSE_MARKER")
        if marker:
            Path(marker).touch()
        time.sleep(float(os.environ.get("DS_TRAINER_PAUSE_SECONDS", "600")))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync directories
    finally:
        os.close(fd)


def save_state(path: str | os.PathLike, state: Any) -> None:
    torch.save(state, path)


def load_state(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"{path}: missing from the checkpoint (incomplete or not a ds-train checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that is not plain tensors/values
        raise TrainerError(f"{path}: cannot load training state ({type(e).__name__}: {e})") from None


# --- RNG state (python, numpy, torch, cuda) as tensors and plain values ---------------------------


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's own GPU only: a checkpoint saved where 8 GPUs are visible must resume where
        # fewer are (each rank's state is stored separately, and ranks map to devices anew).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # 0.1.0 checkpoints: one state per visible GPU
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)
