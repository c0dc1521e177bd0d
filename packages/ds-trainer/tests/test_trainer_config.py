"""TrainConfig: YAML + key=value overrides, unknown keys with a suggestion, type checks; schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ds_trainer import TrainConfig, TrainerError
from ds_trainer.config import ScheduleConfig
from ds_trainer.schedules import build_scheduler, lr_multiplier


def test_yaml_and_overrides(write_config, tiny_config):
    path = write_config(tiny_config)
    cfg = TrainConfig.from_yaml(
        path, ["optim.lr=1e-3", "data.corpus=a.txt", "model.overrides.n_layers=1", "distributed.nodes=2:4"]
    )
    assert cfg.optim.lr == 1e-3  # YAML 1.1 reads "1e-3" as a string: converted, not rejected
    assert cfg.data.corpus == ["a.txt"]
    assert cfg.model.overrides == {"n_layers": 1}
    assert cfg.distributed.node_range() == (2, 4)
    assert cfg.data.seq_len == 32  # from the file
    assert cfg.schedule.name == "warmup-cosine"  # default


def test_round_trip(tmp_path, tiny_config):
    cfg = TrainConfig.from_dict(tiny_config)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "optim.lrr: unknown key (did you mean 'optim.lr'?)"),
        ("lr=1", "lr: unknown key (did you mean 'optim.lr'?)"),
        ("data.seqlen=4", "data.seq_len"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("data.micro_batch_size=2.5", "data.micro_batch_size: expected int, got 2.5"),
        ("lora.enabled=maybe", "lora.enabled: expected bool"),
        ("schedule.name=linear", "schedule.name: expected one of warmup-cosine"),
        ("data.seq_len=0", "data.seq_len: expected a number > 0"),
        ("distributed.nodes=3:2", "distributed.nodes: expected N or MIN:MAX"),
        ("distributed.rdzv_endpoint=nohost", "distributed.rdzv_endpoint: expected HOST:PORT"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(write_config, tiny_config, override, message):
    with pytest.raises(TrainerError) as e:
        TrainConfig.from_yaml(write_config(tiny_config), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_error_in_file_names_the_file(write_config, tiny_config):
    tiny_config["optim"]["betas"] = [0.9]
    path = write_config(tiny_config)
    with pytest.raises(TrainerError, match=rf"^{path}: optim.betas: expected two numbers"):
        TrainConfig.from_yaml(path)
    bad = write_config({"optim": "fast"}, "bad.yaml")
    with pytest.raises(TrainerError, match="optim: expected a mapping"):
        TrainConfig.from_yaml(bad)


def test_trajectory_keys_exclude_run_level_settings(tiny_config):
    a = TrainConfig.from_dict(tiny_config)
    b = a.replace(**{"stop_after_steps": 3, "logging.every": 7, "checkpoint.keep_last": 1, "output_dir": "x"})
    assert a.trajectory_dict() == b.trajectory_dict()
    c = a.replace(**{"optim.lr": 0.5})
    assert a.trajectory_dict()["optim.lr"] != c.trajectory_dict()["optim.lr"]


def test_distill_stage_validation():
    with pytest.raises(TrainerError, match=r"distill.stages\[0\].steps"):
        TrainConfig.from_dict({"distill": {"teacher": "t", "stages": [{"model": "ds-tiny", "steps": 0}]}})
    with pytest.raises(TrainerError, match="unknown key 'lr'"):
        TrainConfig.from_dict(
            {"distill": {"teacher": "t", "stages": [{"model": "ds-tiny", "steps": 1, "lr": 2}]}}
        )


def _lrs(name: str, total: int, **kw) -> list[float]:
    cfg = ScheduleConfig(name=name, steps=total, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine():
    lrs = _lrs("warmup-cosine", 100, warmup_steps=10, min_lr_ratio=0.1)
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    mid = 10 + (100 - 10 - 1) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 89)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # monotone after warmup


def test_warmup_stable_decay():
    lrs = _lrs("warmup-stable-decay", 100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lrs[9] == pytest.approx(1.0)
    assert all(lr == pytest.approx(1.0) for lr in lrs[10:80])  # the stable phase
    assert lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in itertools.pairwise(lrs[80:]))  # linear decay


def test_lr_multiplier_state_loads_weights_only(tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(ScheduleConfig(), 50))
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["lr_lambdas"][0]["total_steps"] == 50
