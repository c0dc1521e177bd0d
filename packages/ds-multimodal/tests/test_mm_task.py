import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_multimodal import MultimodalAligner, embed
from ds_multimodal.cli import main as mm_main
from ds_multimodal.task import AlignTask, collate_items
from ds_trainer.config import TrainConfig
from ds_trainer.errors import TrainerError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "align.yaml"
TINY = [
    "task_options.encoder.embed_dim=32",
    "task_options.encoder.hidden_dim=32",
    "task_options.encoder.n_layers=1",
    "task_options.encoder.n_heads=2",
]


def _ds_train(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from ds_trainer.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
def test_ds_train_align_config_writes_a_loadable_model_directory(tmp_path, capsys):
    out = tmp_path / "run"
    r = _ds_train(
        str(CONFIG), f"output_dir={out}", *TINY, "task_options.audio=false", "task_options.max_train_items=128",
        "data.micro_batch_size=32", "schedule.steps=6", "schedule.warmup_steps=1", "checkpoint.every=3",
        "eval.every=3", "logging.every=1", "logging.progress=false",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    model_dir = out / "model"
    assert {"config.yaml", "model.safetensors", "provenance.json"} <= {p.name for p in model_dir.iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [rec for rec in records if "loss" in rec]
    assert {"loss/text", "loss/image", "loss/video", "pair/text-image"} <= set(train_recs[-1])
    assert any("eval_R@1/text->image" in rec for rec in records)
    # the saved model loads through ds-multimodal's own API, with a fitted calibration
    model = MultimodalAligner.from_pretrained(model_dir)
    assert model.audio is None and model.config.encoder.hidden_dim == 32
    assert any(float(p.detach()) != 0.0 for p in model.calibration.log_scale.values())
    e = embed(model, text=["the digit seven"], image=torch.rand(2, 1, 16, 16))
    assert e["text"].shape == (1, 32) and e["image"].shape == (2, 32)
    # ... and through the CLI's eval
    assert mm_main(["eval", "--model", str(model_dir), "--json", str(tmp_path / "eval.json")]) == 0
    assert "| text->image |" in capsys.readouterr().out
    assert "zero_shot" in json.loads((tmp_path / "eval.json").read_text())


def test_ds_train_bad_task_option_is_one_line_exit_2(tmp_path):
    r = _ds_train(str(CONFIG), f"output_dir={tmp_path / 'run'}", "task_options.colour=red")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "task_options.colour" in r.stderr


def test_align_task_options_are_validated():
    cfg = TrainConfig()
    with pytest.raises(TrainerError, match=r"task_options\.alpha: expected float"):
        AlignTask({"alpha": "big"}, cfg)
    with pytest.raises(TrainerError, match=r"task_options\.beta: expected a number >= 0"):
        AlignTask({"beta": -1}, cfg)
    with pytest.raises(TrainerError, match=r"task_options\.encoder: n_heads: 3 does not divide"):
        AlignTask({"encoder": {"n_heads": 3}}, cfg)


def test_align_task_loss_trains_on_the_modalities_present(calib_split, tiny_encoder_config):
    import dataclasses

    task = AlignTask({"encoder": dataclasses.asdict(tiny_encoder_config), "num_threads": 0}, TrainConfig())
    items = [calib_split[i] for i in range(6)]
    torch.manual_seed(0)
    model = MultimodalAligner(
        __import__("ds_multimodal").AlignerConfig(
            encoder=tiny_encoder_config, audio=calib_split.audio is not None
        )
    )
    batch = task.collate(items)
    assert batch["text_ids"].shape[0] == 6 and batch["labels"].tolist() == calib_split.labels[:6].tolist()
    loss, terms = task.loss(model, batch)
    loss.backward()
    assert loss.ndim == 0 and {"loss/text", "loss/image", "loss/video"} <= set(terms)
    # an item without video drops the video modality from the whole batch; the rest still trains
    items[2] = {**items[2], "video": None}
    batch = collate_items(items, tiny_encoder_config.max_text_len)
    assert "video" not in batch
    _, terms = task.loss(model, batch)
    assert "loss/video" not in terms and "loss/image" in terms


def test_align_task_save_model_leaves_the_training_state_alone(tmp_path, tiny_encoder_config):
    """save_model fits the calibration before writing: it must not move the encoders, the global random
    stream or the train/eval mode, so a run with checkpoints trains exactly like one without."""
    import dataclasses

    options = {"encoder": dataclasses.asdict(tiny_encoder_config), "audio": False, "num_threads": 0}
    task = AlignTask(options, TrainConfig())
    torch.manual_seed(0)
    model = task.build_model().train()
    encoders = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("calibration.")}
    rng = torch.get_rng_state()
    task.save_model(model, tmp_path)
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    state = model.state_dict()
    for k, v in encoders.items():
        torch.testing.assert_close(state[k], v)
    assert not any(p.requires_grad for p in model.calibration.parameters())  # frozen again for training
    loaded = AlignTask.load_model(tmp_path)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert any(float(p.detach()) != 0.0 for p in loaded.calibration.log_scale.values())  # fitted, saved
