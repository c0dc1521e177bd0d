"""Real multi-process runs: torchrun with 2 gloo processes on CPU, and a SIGKILL in the middle of a
checkpoint save followed by a resume. Also scrapes the Prometheus endpoint of the live run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

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


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume(tiny_config):
    """strategy fsdp on a 2-process gloo group really shards (FSDP2 fully_shard; accelerate alone
    would fall back to DDP on CPU), matches the 1-process run, and resumes from its checkpoint."""
    tiny_config["checkpoint"] = {"every": 2, "keep_last": 2}
    one = DistributedTrainer(tiny_config, output_dir=tiny_config["output_dir"] + "-1").train()
    fsdp = dict(
        output_dir=tiny_config["output_dir"] + "-fsdp",
        gpus_per_node=2,
        data__micro_batch_size=2,
        distributed__strategy="fsdp",
    )
    first = DistributedTrainer(tiny_config, stop_after_steps=4, **fsdp).train()
    assert (first.step, first.world_size, first.parallelism) == (4, 2, "fsdp2")
    ckpt = Path(fsdp["output_dir"], "checkpoints", "step_00000004")
    assert (ckpt / "model" / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    # Resharding: the 2-process FSDP checkpoint also resumes in ONE process (same global batch,
    # split as 4 x 2 instead of 2 x 2 x 2 processes), and the losses continue where they were.
    single_dir = tiny_config["output_dir"] + "-resharded"
    shutil.copytree(fsdp["output_dir"], single_dir)
    single = DistributedTrainer(tiny_config, output_dir=single_dir).train()
    assert single.resumed_from.endswith("step_00000004") and (single.step, single.world_size) == (8, 1)
    for step in range(5, 9):
        assert single.losses[step] == pytest.approx(one.losses[step], abs=1e-4), step
    second = DistributedTrainer(tiny_config, **fsdp).train()  # a new torchrun group resumes it
    assert second.resumed_from.endswith("step_00000004") and second.step == 8
    losses = {**first.losses, **second.losses}
    assert sorted(losses) == sorted(one.losses)
    for step, loss in one.losses.items():
        assert losses[step] == pytest.approx(loss, abs=1e-4), step
    assert second.eval_loss == pytest.approx(one.eval_loss, abs=1e-4)
    from ds_models import Transformer

    a = Transformer.from_pretrained(one.model_dir).state_dict()
    b = Transformer.from_pretrained(second.model_dir).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3)
    prov = json.loads(Path(second.model_dir, "provenance.json").read_text())
    assert prov["parallelism"] == "fsdp2" and prov["world_size"] == 2


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


@pytest.mark.slow
def test_elastic_node_loss_continues_from_last_checkpoint_with_fewer_workers(tiny_config, write_config):
    """Two torchrun agents ("nodes") join one elastic c10d rendezvous (--nnodes 1:2). The second is
    SIGKILLed mid-run; the first agent restarts its worker, the group re-forms with one node, and
    the run resumes from the last complete checkpoint and finishes (global batch 16 -> 8)."""
    tiny_config.update(
        schedule={"steps": 40, "warmup_steps": 2},
        checkpoint={"every": 4, "keep_last": 2},
        distributed={
            "nodes": "1:2",
            "gpus_per_node": 1,
            "rdzv_endpoint": f"127.0.0.1:{_free_port()}",
            "rdzv_id": f"elastic-{os.getpid()}",
            "max_restarts": 1,
        },
    )
    cfg = TrainConfig.from_dict(tiny_config)
    config_path = write_config(tiny_config)
    cmd = torchrun_command(cfg, config_path)
    env = {**os.environ, "DS_TRAIN_LAUNCHED": "1", "PYTHONUNBUFFERED": "1"}
    out = Path(tiny_config["output_dir"])
    host = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # the first agent hosts the rendezvous store
    node2 = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for(out / "checkpoints" / "step_00000008", host, timeout=300)
        # The node vanishes without a goodbye: its agent and its worker (torchrun starts workers in
        # their own sessions, so killing the agent's process group alone would leave it training).
        import psutil

        agent = psutil.Process(node2.pid)
        for proc in [*agent.children(recursive=True), agent]:
            proc.kill()
        node2.wait(timeout=30)
        _, stderr = host.communicate(timeout=400)
    finally:
        for p in (host, node2):
            if p.poll() is None:
                p.kill()
    assert host.returncode == 0, stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 40 and result["world_size"] == 1
    assert result["resumed_from"] is not None and int(result["resumed_from"].rsplit("_", 1)[1]) >= 8
    assert "global batch 16 (checkpoint) -> 8" in stderr  # the survivor says the split changed
    # The losses before the loss of the node were written by the 2-node group, after it by the survivor.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in records if "loss" in r})
    assert steps[-1] == 40 and steps[0] == 1
