"""CheckpointManager: atomic rename, keep-last-k after completion, weights-only state, RNG states."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ds_trainer import CheckpointManager, TrainerError
from ds_trainer.checkpoint import load_state, rng_state, save_state, set_rng_state


def _write(tmp):
    (tmp / "a.txt").write_text("x")


def test_save_renames_and_keeps_last_k(tmp_path):
    m = CheckpointManager(tmp_path / "ck", keep_last=2)
    for step in (1, 2, 3):
        m.save(step, _write)
    assert [p.name for p in m.complete()] == ["step_00000002", "step_00000003"]
    assert m.latest().name == "step_00000003"
    assert not [p for p in (tmp_path / "ck").iterdir() if ".tmp-" in p.name]


def test_failed_save_leaves_previous_checkpoints(tmp_path):
    m = CheckpointManager(tmp_path / "ck", keep_last=1)
    m.save(1, _write)

    def half_written(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        m.save(2, half_written)
    # keep_last=1 must not have deleted step 1 for a step 2 that never completed.
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_00000001"]


def test_partial_dirs_are_ignored_and_removed(tmp_path):
    m = CheckpointManager(tmp_path / "ck", keep_last=3)
    m.save(2, _write)
    killed = tmp_path / "ck" / "step_00000004.tmp-abcd"  # what a SIGKILL mid-save leaves
    killed.mkdir()
    assert m.latest().name == "step_00000002"
    assert m.remove_partial() == [killed]
    assert not killed.exists()


def test_rng_state_round_trip_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_state(tmp_path / "rng.pt", [rng_state()])
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_state(tmp_path / "rng.pt")[0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA RNG state needs a GPU")
def test_cuda_rng_state_is_this_process_gpu_only(tmp_path):
    """A checkpoint saved where several GPUs were visible resumes where one is: the state holds the
    process's own GPU, and an older per-GPU list longer than the visible GPUs still restores."""
    torch.cuda.manual_seed(3)
    state = rng_state()
    assert isinstance(state["cuda"], torch.Tensor)
    save_state(tmp_path / "rng.pt", [state])
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(9)
    set_rng_state(load_state(tmp_path / "rng.pt")[0])
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    old = dict(state, cuda=[state["cuda"]] * (torch.cuda.device_count() + 3))
    torch.cuda.manual_seed(9)
    set_rng_state(old)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_state_files_never_run_code(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(TrainerError, match=r"evil\.pt: cannot load training state"):
        load_state(tmp_path / "evil.pt")
    with pytest.raises(TrainerError, match=r"missing\.pt: missing from the checkpoint"):
        load_state(tmp_path / "missing.pt")
