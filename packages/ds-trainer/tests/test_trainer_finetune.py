"""LoRA (peft), logit distillation with a progressive chain, and DP-SGD (opacus) on ds-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_models import ModelConfig, Transformer
from ds_trainer import DistributedTrainer, TrainConfig
from ds_trainer.config import LoRAConfig
from ds_trainer.distill import kd_token_sum
from ds_trainer.lora import apply_lora, merged_state


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_path) -> str:
    """A ds-tiny trained for a few steps: the base for LoRA and the teacher for distillation."""
    out = tmp_path_factory.mktemp("base")
    cfg = {
        "output_dir": str(out),
        "data": {
            "tokenizer": tokenizer_path,
            "seq_len": 32,
            "micro_batch_size": 8,
            "max_train_sequences": 128,
        },
        "optim": {"lr": 5e-3},
        "schedule": {"steps": 16, "warmup_steps": 2},
        "logging": {"progress": False},
    }
    return DistributedTrainer(cfg).train().model_dir


def _first_last(result) -> tuple[float, float]:
    steps = sorted(result.losses)
    k = max(1, len(steps) // 4)
    return (sum(result.losses[s] for s in steps[:k]) / k, sum(result.losses[s] for s in steps[-k:]) / k)


def _assert_rdp_epsilon(result, *, noise: float, sample_rate: float, steps: int, delta: float = 1e-5) -> None:
    """The reported epsilon is opacus' RDP accountant's for this noise, sample rate and step count."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise, sample_rate, steps)]
    assert result.epsilon == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-6)


def test_lora_trains_a_fraction_and_merges_into_a_plain_model(tiny_config, pretrained):
    result = DistributedTrainer(
        tiny_config, model_path=pretrained, lora__enabled=True, lora__r=4, optim__lr=2e-2, schedule__steps=16
    ).train()
    first, last = _first_last(result)
    assert last < first - 0.05
    base = Transformer.from_pretrained(pretrained)
    counts = {id(p): p.numel() for p in base.parameters()}
    # r=4 adapters on 7 Linears x 2 layers of ds-tiny: (in + out) * r each.
    d, kv, ff = base.config.d_model, base.config.n_kv_heads * base.config.head_dim, base.config.d_ff
    per_layer = 4 * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 2 + (ff + d))
    expected = per_layer * base.config.n_layers
    assert result.trainable_fraction == pytest.approx(expected / (sum(counts.values()) + expected))

    merged = Transformer.from_pretrained(result.model_dir)  # a plain ds-models directory: no peft needed
    assert not any("lora" in k for k in merged.state_dict())
    prov = json.loads(Path(result.model_dir, "provenance.json").read_text())
    assert prov["parent"] == str(Path(pretrained).resolve()) and prov["lora"]["merged"]
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in LoRAConfig().target_modules for k in changed)


def test_lora_merge_matches_adapter_forward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("ds-tiny"))
    cfg = LoRAConfig(r=4, alpha=8)
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # peft starts B at zero; make the adapters do something
    ids = torch.randint(0, 512, (2, 16))
    plain = Transformer(model.config)
    plain.load_state_dict(merged_state(model.state_dict(), cfg))
    torch.testing.assert_close(plain.eval()(ids), model.eval()(ids), atol=1e-5, rtol=1e-4)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    s = torch.randn(2, 5, 11)
    targets = torch.zeros(2, 5, dtype=torch.long)
    assert kd_token_sum(s, s.clone(), targets, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_token_sum(s, torch.randn(2, 5, 11), targets, 2.0).item() > 0
    targets[0] = -100  # ignored tokens do not count
    assert kd_token_sum(s, s + torch.randn_like(s) * (torch.arange(2) == 0).view(2, 1, 1), targets, 2.0) == 0


@pytest.mark.slow
def test_distillation_and_progressive_chain(tiny_config, pretrained):
    student = DistributedTrainer(
        tiny_config, distill__teacher=pretrained, model__overrides={"n_layers": 1}, schedule__steps=12
    ).train()
    first, last = _first_last(student)
    assert last < first - 0.3
    assert json.loads(Path(student.model_dir, "provenance.json").read_text())["teacher"] == pretrained

    chain = TrainConfig.from_dict(tiny_config).replace(
        **{
            "output_dir": tiny_config["output_dir"] + "-chain",
            "distill.teacher": pretrained,
            "distill.stages": [
                {"model": "ds-tiny", "steps": 4, "overrides": {"d_model": 48}},
                {"model": "ds-tiny", "steps": 4, "overrides": {"d_model": 32, "n_layers": 1}},
            ],
        }
    )
    result = DistributedTrainer(chain).train()
    assert [s["teacher"] for s in result.stages] == [pretrained, result.stages[0]["model_dir"]]
    final = Transformer.from_pretrained(result.model_dir)
    assert (final.config.d_model, final.config.n_layers) == (32, 1)
    second_prov = json.loads(Path(result.model_dir, "provenance.json").read_text())
    assert second_prov["teacher"].endswith("stage_0/model")


@pytest.mark.slow
def test_dp_sgd_trains_and_reports_epsilon(tiny_config):
    tiny_config["data"].update(micro_batch_size=16, grad_accum_steps=1, max_train_sequences=96)
    result = DistributedTrainer(
        tiny_config,
        dp__enabled=True,
        dp__noise_multiplier=0.5,
        dp__max_grad_norm=1.0,
        optim__lr=1e-2,
        schedule__steps=12,
    ).train()
    first, last = _first_last(result)
    assert last < first - 0.1
    # The epsilon is the RDP accountant's for these steps: 12 steps at sample rate 16/96.
    _assert_rdp_epsilon(result, noise=0.5, sample_rate=16 / 96, steps=12)
    prov = json.loads(Path(result.model_dir, "provenance.json").read_text())
    assert prov["dp"]["epsilon"] == pytest.approx(result.epsilon) and prov["dp"]["delta"] == 1e-5


@pytest.mark.slow
def test_dp_sgd_in_two_processes(tiny_config):
    """opacus' distributed DP-SGD: DPDDP, noise added once, Poisson batches from each process's
    shard at the global sample rate; the accountant sees the global batch of 2 x 8 sequences."""
    tiny_config["data"].update(micro_batch_size=8, grad_accum_steps=1, max_train_sequences=96)
    result = DistributedTrainer(
        tiny_config,
        gpus_per_node=2,
        dp__enabled=True,
        dp__noise_multiplier=0.5,
        dp__max_grad_norm=1.0,
        optim__lr=1e-2,
        schedule__steps=12,
    ).train()
    assert result.world_size == 2 and result.step == 12
    first, last = _first_last(result)
    assert last < first - 0.1
    _assert_rdp_epsilon(result, noise=0.5, sample_rate=16 / 96, steps=12)
    prov = json.loads(Path(result.model_dir, "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["dp"]["epsilon"] == pytest.approx(result.epsilon)
