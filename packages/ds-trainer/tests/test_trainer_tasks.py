"""Task plugins: a toy regression task found through the ``ds_trainer.tasks`` entry-point group
(tests/toy_plugin) trains with the trainer's loop: loss falls, named loss terms reach the JSONL
log, TensorBoard and Prometheus, checkpoints resume bit for bit, 2 processes match 1."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from ds_trainer import DistributedTrainer, Task, TrainConfig, TrainerError, read_metrics, register_task
from ds_trainer.cli import main
from ds_trainer.config import LoggingConfig
from ds_trainer.metrics import MetricsLogger
from ds_trainer.tasks import load_task_class, task_names


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_task_trains_logs_named_terms_and_saves_its_model(toy_config):
    cfg = TrainConfig.from_dict(toy_config).replace(**{"logging.tensorboard": True, "eval.every": 8})
    result = DistributedTrainer(cfg).train()
    assert result.task == "toy-regression" and result.step == 24
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert _mean(losses[-4:]) < 0.5 * _mean(losses[:4])

    records = read_metrics(Path(result.output_dir, "metrics.jsonl"))
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 25))
    for r in train:  # the terms are example-weighted over the window like the loss itself
        assert r["loss"] == pytest.approx(r["loss/mse"] + 0.1 * r["loss/l1"], rel=1e-5)
        assert r["examples_per_second"] > 0 and r["grad_norm"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert evals[-1]["eval_loss"] == pytest.approx(
        evals[-1]["eval_loss/mse"] + 0.1 * evals[-1]["eval_loss/l1"]
    )

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(Path(result.output_dir, "tensorboard")))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss/mse")] == list(range(1, 25))

    # The model directory: the task's own files plus provenance; load_model gives the trained model.
    prov = json.loads(Path(result.model_dir, "provenance.json").read_text())
    assert prov["task"] == "toy-regression" and prov["config"]["task_options"] == {"hidden": 32}
    assert prov["data"]["train"] == "list of 256 items" and prov["steps"] == 24
    cls = load_task_class("toy-regression")
    model = cls.load_model(result.model_dir)
    task = cls({"hidden": 32}, cfg)
    _, eval_items = task.build_datasets()
    batch = task.collate(eval_items)
    with torch.no_grad():
        err = model(batch["x"]) - batch["y"]
    assert result.eval_loss == pytest.approx(float(err.pow(2).mean() + 0.1 * err.abs().mean()), rel=1e-5)


def test_task_stop_and_resume_is_bitwise_identical(toy_config):
    toy_config["checkpoint"] = {"every": 3, "keep_last": 2}
    toy_config["schedule"]["steps"] = 10
    full = DistributedTrainer(toy_config, output_dir=toy_config["output_dir"] + "-full").train()

    first = DistributedTrainer(toy_config, stop_after_steps=5).train()
    assert first.step == 5 and first.model_dir is None
    ckpt = Path(toy_config["output_dir"], "checkpoints", "step_00000005")
    assert (ckpt / "model" / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    second = DistributedTrainer(toy_config).train()
    assert second.resumed_from.endswith("step_00000005")
    assert {**first.losses, **second.losses} == full.losses  # exact float equality, every step

    cls = load_task_class("toy-regression")
    a = cls.load_model(full.model_dir).state_dict()
    b = cls.load_model(second.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_and_micro_batch_split_give_the_same_steps(toy_config):
    toy_config["schedule"]["steps"] = 6
    toy_config["data"].update(micro_batch_size=16, grad_accum_steps=1)
    one = DistributedTrainer(toy_config, output_dir=toy_config["output_dir"] + "-a").train()
    toy_config["data"].update(micro_batch_size=4, grad_accum_steps=4)
    four = DistributedTrainer(toy_config, output_dir=toy_config["output_dir"] + "-b").train()
    for step in one.losses:
        assert four.losses[step] == pytest.approx(one.losses[step], abs=1e-5)


class _Halved(Task):
    """Registered in-process: a subclass of the plugin's task with other defaults."""

    def __init__(self, options, cfg):
        base = load_task_class("toy-regression")
        self._inner = base({"hidden": 8, "train_items": 64, "eval_items": 0, **options}, cfg)
        super().__init__(options, cfg)

    def build_model(self):
        return self._inner.build_model()

    def build_datasets(self):
        train, _ = self._inner.build_datasets()
        return train, None

    def loss(self, model, batch):
        return self._inner.loss(model, batch)

    def save_model(self, model, directory):
        torch.save(model.state_dict(), directory / "weights.pt")  # its own format

    @classmethod
    def load_model(cls, directory):
        raise AssertionError("not called by a run that does not resume")


def test_register_task_in_process(toy_config):
    register_task("toy-inproc", _Halved)
    assert "toy-inproc" in task_names() and "toy-regression" in task_names()
    result = DistributedTrainer(
        toy_config, task="toy-inproc", task_options={}, schedule__steps=3, data__micro_batch_size=4
    ).train()
    assert result.step == 3 and result.eval_loss is None
    assert (
        Path(result.model_dir, "weights.pt").is_file() and Path(result.model_dir, "provenance.json").is_file()
    )
    with pytest.raises(TrainerError, match="built-in language-model task"):
        register_task("lm", _Halved)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task=toy-regresion"], "task: 'toy-regresion': unknown task (did you mean 'toy-regression'?"),
        (
            ["task_options.hiden=4"],
            "task_options.hiden: unknown option of task toy-regression (did you mean 'hidden'?)",
        ),
        (["task_options.hidden=wide"], "task_options.hidden: expected int, got 'wide'"),
        (["task_options.train_items=0"], "task_options.train_items: expected a positive int, got 0"),
        (["lora.enabled=true"], "lora.enabled: only for task lm (task toy-regression trains its own model)"),
        (["task=nosuchmodule:Task"], "task: nosuchmodule:Task: cannot import (ModuleNotFoundError"),
    ],
)
def test_bad_task_input_is_one_line_and_exit_2(toy_config, write_config, capsys, overrides, expected):
    code = main([write_config(toy_config), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("ds-train: error: ") and expected in err and "\n" not in err
    assert not Path(toy_config["output_dir"]).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_named_terms_reach_prometheus(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    port = _free_port()
    logger = MetricsLogger(
        tmp_path,
        LoggingConfig(prometheus_port=port),
        is_main=True,
        is_local_main=True,
        device=torch.device("cpu"),
    )
    try:
        logger.log(3, {"loss": 0.5, "loss/text_image": 0.3, "examples_per_second": 120.0, "epoch": 0})
        logger.log(3, {"eval_loss": 0.6, "eval_recall@1": 0.25})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        logger.close()
    samples = {
        (s.name, s.labels.get("name")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("ds_train_loss", None)] == 0.5
    assert samples[("ds_train_term", "loss/text_image")] == 0.3
    assert samples[("ds_train_term", "eval_recall@1")] == 0.25
    assert samples[("ds_train_examples_per_second", None)] == 120.0
    assert samples[("ds_train_eval_loss", None)] == 0.6
    assert ("ds_train_term", "epoch") not in samples


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "parallelism"), [("ddp", "ddp"), ("fsdp", "fsdp2")])
def test_task_two_processes_match_one(toy_config, strategy, parallelism):
    """torchrun children find the task through its entry point, like an installed plugin; FSDP
    shards the task's declared units (fsdp_units)."""
    toy_config["schedule"]["steps"] = 6
    one = DistributedTrainer(toy_config, output_dir=toy_config["output_dir"] + "-1").train()
    two = DistributedTrainer(
        toy_config,
        output_dir=toy_config["output_dir"] + "-2",
        gpus_per_node=2,
        data__micro_batch_size=4,
        distributed__strategy=strategy,
    ).train()
    assert (one.world_size, two.world_size, two.parallelism) == (1, 2, parallelism)
    for step, loss in one.losses.items():
        assert two.losses[step] == pytest.approx(loss, abs=1e-5), step
    assert two.eval_loss == pytest.approx(one.eval_loss, abs=1e-5)
