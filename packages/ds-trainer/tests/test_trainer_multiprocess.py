"""Real multi-process runs: torchrun with 2 gloo processes on CPU, and a SIGKILL in the middle of a
checkpoint save followed by a resume. Also scrapes the Prometheus endpoint of the live run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ds_trainer import DistributedTrainer
from ds_trainer.config import TrainConfig
from ds_trainer.launch import torchrun_command


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(tiny_config, losses_of):
    # 1 process: micro-batch 4 x 2 accumulation; 2 processes: micro-batch 2 x 2 each. Global batch 8.
    one = DistributedTrainer(tiny_config, output_dir=tiny_config["output_dir"] + "-1").train()
    two = DistributedTrainer(
        tiny_config, output_dir=tiny_config["output_dir"] + "-2", gpus_per_node=2, data__micro_batch_size=2
    ).train()  # no process group here: launches itself through torchrun (gloo on CPU)
    assert two.step == one.step == 8
    assert losses_of(two.output_dir) == two.losses
    for step, loss in one.losses.items():
        assert two.losses[step] == pytest.approx(loss, abs=1e-4), step
    assert two.eval_loss == pytest.approx(one.eval_loss, abs=1e-4)
    # Both processes took part (accelerate saw a gloo group of 2, not one process twice).
    assert two.world_size == 2 and one.world_size == 1
    assert json.loads(Path(two.model_dir, "provenance.json").read_text())["world_size"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run exited early: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the save never paused")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(
    tiny_config, write_config, run_cli, losses_of, tmp_path
):
    from prometheus_client.parser import text_string_to_metric_families

    tiny_config["checkpoint"] = {"every": 2, "keep_last": 1}
    reference = DistributedTrainer(tiny_config, output_dir=str(tmp_path / "reference")).train()

    port = _free_port()
    tiny_config["logging"]["prometheus_port"] = port
    config = write_config(tiny_config)
    marker = tmp_path / "paused"
    env = {**os.environ, "DS_TRAINER_PAUSE_IN_SAVE": "4", "DS_TRAINER_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ds_trainer.cli", config], env=env, stderr=subprocess.PIPE, text=True
    )
    _wait_for(marker, proc)  # the step-4 save is half written now

    # The live run's metrics endpoint, scraped over HTTP and parsed.
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    metrics = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert metrics["ds_train_step"] == 4
    assert metrics["ds_train_loss"] == pytest.approx(losses_of(tiny_config["output_dir"])[4])
    assert metrics["ds_train_tokens_per_second"] > 0
    assert metrics["ds_train_grad_norm"] > 0
    assert 0 < metrics["ds_train_lr"] <= tiny_config["optim"]["lr"]
    assert metrics["ds_train_memory_bytes"] > 0

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = Path(tiny_config["output_dir"]) / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names[0] == "step_00000002" and names[1].startswith(
        "step_00000004.tmp-"
    )  # keep_last=1 kept step 2

    resumed = run_cli("resume", tiny_config["output_dir"], "logging.prometheus_port=0")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((Path(tiny_config["output_dir"]) / "result.json").read_text())
    assert result["resumed_from"].endswith("step_00000002")
    assert losses_of(tiny_config["output_dir"]) == reference.losses  # steps 3.. recomputed exactly
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000008"]  # partial save cleaned up


def test_multi_node_command_uses_c10d_rendezvous_and_elastic_range(tiny_config):
    cfg = TrainConfig.from_dict(tiny_config).replace(
        **{"distributed.nodes": "2:4", "distributed.gpus_per_node": 8, "distributed.rdzv_endpoint": "head:29400",
           "distributed.max_restarts": 3}
    )  # fmt: skip
    cmd = torchrun_command(cfg, "/shared/run/launch_config.yaml")
    joined = " ".join(cmd)
    assert "--nnodes 2:4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint head:29400" in joined
    assert "--max-restarts 3" in joined and "--standalone" not in joined
    assert cmd[-4:] == ["-m", "ds_trainer.cli", "train", "/shared/run/launch_config.yaml"]
    local = torchrun_command(cfg.replace(**{"distributed.nodes": "1"}), "c.yaml")
    assert "--standalone" in local and "--rdzv-endpoint" not in local
