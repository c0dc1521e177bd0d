"""In-process training of ds-tiny: loss falls, exact resume, token-normalised accumulation, eval and
early stop, provenance of the saved model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_models import Transformer
from ds_trainer import DistributedTrainer, TrainConfig, TrainerError


def test_loss_falls_and_model_directory_has_provenance(tiny_config):
    tiny_config["schedule"]["steps"] = 24
    result = DistributedTrainer(tiny_config).train()
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    assert result.eval_loss is not None and result.eval_loss < losses[0]

    model = Transformer.from_pretrained(result.model_dir)
    prov = json.loads(Path(result.model_dir, "provenance.json").read_text())
    assert prov["parent"] == "ds-tiny (fresh weights)"
    assert len(prov["data"]["train"]) == 32  # ds-data content fingerprint
    assert prov["config"]["optim"]["lr"] == tiny_config["optim"]["lr"]
    assert "ds-trainer" in prov["trainer_packages"] and "torch" in prov["packages"]
    assert prov["steps"] == 24 and prov["final_loss"] == losses[-1]
    assert model.config.vocab_size == 512


def test_stop_and_resume_is_bitwise_identical(tiny_config):
    tiny_config["checkpoint"]["every"] = 3
    full = DistributedTrainer(tiny_config, output_dir=tiny_config["output_dir"] + "-full").train()

    first = DistributedTrainer(tiny_config, stop_after_steps=5).train()
    assert first.step == 5 and first.model_dir is None
    second = DistributedTrainer(tiny_config).train()
    assert second.resumed_from.endswith("step_00000005")
    assert {**first.losses, **second.losses} == full.losses  # exact float equality, every step

    a = Transformer.from_pretrained(full.model_dir).state_dict()
    b = Transformer.from_pretrained(second.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_normalises_by_tokens(tiny_config):
    """micro-batch 8 x 1 and micro-batch 2 x 4 see the same sequences per step: same trajectory."""
    tiny_config["data"].update(micro_batch_size=8, grad_accum_steps=1)
    one = DistributedTrainer(tiny_config, output_dir=tiny_config["output_dir"] + "-a").train()
    tiny_config["data"].update(micro_batch_size=2, grad_accum_steps=4)
    four = DistributedTrainer(tiny_config, output_dir=tiny_config["output_dir"] + "-b").train()
    for step in one.losses:
        assert four.losses[step] == pytest.approx(one.losses[step], abs=1e-4)


def test_bf16_and_gradient_checkpointing_train(tiny_config):
    cfg = TrainConfig.from_dict(tiny_config).replace(
        **{"precision.dtype": "bf16", "model.gradient_checkpointing": True, "schedule.steps": 12}
    )
    result = DistributedTrainer(cfg).train()
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_early_stop(tiny_config):
    # A learning rate so small that the eval loss cannot improve by min_delta: stop after patience.
    cfg = TrainConfig.from_dict(tiny_config).replace(
        **{
            "optim.lr": 1e-9,
            "schedule.steps": 20,
            "eval.every": 2,
            "eval.patience": 2,
            "eval.min_delta": 0.01,
        }
    )
    result = DistributedTrainer(cfg).train()
    assert result.stopped_early
    assert result.step == 6  # evals at 2 (best), 4 and 6 (no improvement) -> stop
    assert result.model_dir is not None


def test_resume_with_different_config_is_rejected_before_writing(tiny_config):
    tiny_config["schedule"]["steps"] = 2
    DistributedTrainer(tiny_config).train()
    ckpts = Path(tiny_config["output_dir"]) / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    with pytest.raises(TrainerError, match=r"different config: optim.lr: 0.003 \(checkpoint\) != 0.1"):
        DistributedTrainer(tiny_config, optim__lr=0.1).train()
    assert sorted(p.name for p in ckpts.iterdir()) == before


def test_in_memory_model_and_dataset(tiny_config):
    """ds-multimodal and the benchmarks pass objects instead of paths."""
    from ds_models import ModelConfig

    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 64, (17,))} for _ in range(32)]
    model = Transformer(ModelConfig.from_name("ds-tiny", vocab_size=64))
    cfg = TrainConfig.from_dict(tiny_config).replace(**{"data.seq_len": 16, "schedule.steps": 4})
    result = DistributedTrainer(cfg, model=model, train_dataset=rows).train()
    assert result.step == 4
    assert Transformer.from_pretrained(result.model_dir).config.vocab_size == 64


def test_in_memory_model_resumes_the_checkpoint_weights(tiny_config):
    """A script that passes a freshly built model and restarts after a stop must continue from the
    checkpoint's weights, not from its new random ones (the optimizer state alone is restored too)."""
    from ds_models import ModelConfig

    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 64, (17,))} for _ in range(32)]
    mc = ModelConfig.from_name("ds-tiny", vocab_size=64)
    cfg = TrainConfig.from_dict(tiny_config).replace(**{"data.seq_len": 16, "schedule.steps": 6})

    def fresh(seed: int) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(mc)

    whole = DistributedTrainer(
        cfg, model=fresh(1), train_dataset=rows, output_dir=cfg.output_dir + "-whole"
    ).train()
    DistributedTrainer(cfg, model=fresh(1), train_dataset=rows, stop_after_steps=3).train()
    resumed = DistributedTrainer(cfg, model=fresh(2), train_dataset=rows).train()  # other random weights
    assert resumed.resumed_from.endswith("step_00000003") and resumed.step == 6
    for step in (4, 5, 6):
        assert resumed.losses[step] == whole.losses[step], step
    a = Transformer.from_pretrained(whole.model_dir).state_dict()
    b = Transformer.from_pretrained(resumed.model_dir).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_in_memory_model_that_does_not_fit_the_checkpoint_is_a_clear_error(tiny_config):
    from ds_models import ModelConfig

    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 64, (17,))} for _ in range(32)]
    cfg = TrainConfig.from_dict(tiny_config).replace(**{"data.seq_len": 16, "schedule.steps": 6})
    mc = ModelConfig.from_name("ds-tiny", vocab_size=64)
    DistributedTrainer(cfg, model=Transformer(mc), train_dataset=rows, stop_after_steps=3).train()
    wider = Transformer(ModelConfig.from_name("ds-tiny", vocab_size=64, d_ff=96))
    with pytest.raises(TrainerError, match=r"do not fit the given model: .*step_00000003.*shape"):
        DistributedTrainer(cfg, model=wider, train_dataset=rows).train()
