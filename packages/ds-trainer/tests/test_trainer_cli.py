"""The ds-train command line: a full run with TensorBoard, --help, and bad input (one line, exit 2,
nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds_trainer.cli import main


def test_cli_run_writes_model_metrics_and_tensorboard(tiny_config, write_config, run_cli):
    tiny_config["logging"]["tensorboard"] = True
    config = write_config(tiny_config)
    proc = run_cli(config, "schedule.steps=4", "data.micro_batch_size=2")
    assert proc.returncode == 0, proc.stderr
    assert "ds-train: done: step 4/4, loss " in proc.stderr.splitlines()[-1]
    out = Path(tiny_config["output_dir"])
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["launch", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--rdzv-endpoint" in out and "(default: None)" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim.lrr=1"], "override 'optim.lrr=1': optim.lrr: unknown key (did you mean 'optim.lr'?)"),
        (["data.micro_batch_size=two"], "data.micro_batch_size: expected int, got 'two'"),
        (["data.corpus=/no/such/corpus.txt"], "data.corpus: /no/such/corpus.txt: file not found"),
        (["model.path=/no/such/model"], "model.path: /no/such/model: no such model directory"),
        (["precision.dtype=fp16"], "precision.dtype: fp16 needs a CUDA GPU"),
        (["data.seq_len=4096"], "data.seq_len: 4096 exceeds the model's max_seq_len 256"),
        (
            ["dp.enabled=true", "distributed.strategy=fsdp"],
            "distributed.strategy: DP-SGD runs with ddp (opacus' DPDDP), not fsdp",
        ),
        (["task=lmm"], "task: 'lmm': unknown task (did you mean 'lm'?"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_config, write_config, capsys, args, expected):
    code = main([write_config(tiny_config), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("ds-train: error: ") and expected in err and "\n" not in err
    assert not (Path(tiny_config["output_dir"]) / "checkpoints").exists()


def test_bad_config_file_and_resume_dir(tmp_path, capsys, tiny_config, write_config):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1\n")
    assert main([str(bad)]) == 2
    assert "bad.yaml: line 2: not valid YAML" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a ds-train output directory" in capsys.readouterr().err
    assert main(["launch", write_config(tiny_config), "--nodes", "3:1"]) == 2
    assert "--nodes: expected N or MIN:MAX" in capsys.readouterr().err


def test_resume_from_a_different_config_is_refused_without_writing(tiny_config, write_config, capsys):
    config = write_config(tiny_config)
    assert main([config, "schedule.steps=2"]) == 0
    ckpts = Path(tiny_config["output_dir"]) / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    capsys.readouterr()
    assert main([config, "schedule.steps=2", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "resume directory was written by a different config: optim.lr" in err and "\n" not in err
    assert sorted(p.name for p in ckpts.iterdir()) == before
    assert main(["resume", tiny_config["output_dir"], "data.seq_len=16"]) == 2
    assert "different config: data.seq_len: 32 (checkpoint) != 16" in capsys.readouterr().err
