"""The built-in task (``task: lm``): a ds-models language model on a ds-data corpus.

Model (registry name, ModelConfig YAML or model directory; LoRA adapters on top), data (corpus ->
tokenizer -> packed sequences of ``seq_len + 1`` tokens), the loss (next-token cross-entropy, mixed
with logit distillation from a teacher), evaluation and the model directory it writes.

The loss of an optimizer step is the sum of token losses over the whole accumulation window and
all processes divided by the number of target tokens in it, not a mean of per-micro-batch means:
every token weighs the same however the batch is split, which is what lets a 2-process run match
a 1-process run at the same global batch. So ``loss_sum`` returns token sums and ``weight`` the
target-token count; the run divides.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ds_trainer.config import ModelSpec, TrainConfig
from ds_trainer.data import PreparedData, collate, iterate_eval, prepare_data
from ds_trainer.distill import kd_token_sum
from ds_trainer.errors import TrainerError
from ds_trainer.lora import adapter_state, apply_lora, merged_state

IGNORE = -100


def check_paths(cfg: TrainConfig) -> None:
    """Fail early on a missing model or data file (before processes start or anything is written)."""
    from ds_models import REGISTRY

    for label, path in (("model.path", cfg.model.path), ("distill.teacher", cfg.distill.teacher)):
        if path and not Path(path).exists() and path not in REGISTRY:
            raise TrainerError(
                f"{label}: {path}: no such model directory, config YAML or registry name ({', '.join(REGISTRY)})"
            )
    for item in cfg.data.corpus:
        if item != "builtin" and not Path(item).is_file():
            raise TrainerError(f"data.corpus: {item}: file not found")


def load_model(spec: ModelSpec, resume_model_dir: Path | None = None) -> tuple[nn.Module, str]:
    """The model to train (fp32 master weights) and a description of its parent for provenance."""
    from ds_models import REGISTRY, ModelConfig, ModelError, Transformer

    path = Path(spec.path)
    try:
        if resume_model_dir is not None:
            return Transformer.from_pretrained(resume_model_dir, dtype=torch.float32).train(), spec.path
        if path.is_dir():
            if spec.overrides:
                raise TrainerError(
                    f"model.overrides: only for a fresh model; {spec.path} is a model directory"
                )
            return Transformer.from_pretrained(path, dtype=torch.float32).train(), str(path.resolve())
        if path.suffix in (".yaml", ".yml") and path.is_file():
            mc = ModelConfig.from_dict({**ModelConfig.from_yaml(path).to_dict(), **spec.overrides})
        elif spec.path in REGISTRY:
            mc = ModelConfig.from_name(spec.path, **spec.overrides)
        else:
            raise TrainerError(
                f"model.path: {spec.path}: no such model directory, config YAML or registry name "
                f"({', '.join(REGISTRY)})"
            )
        return Transformer(mc).train(), f"{spec.path} (fresh weights)"
    except ModelError as e:
        raise TrainerError(f"model.path: {e}") from None


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies; logits (B, T, V), targets (B, T) with -100 ignored."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


class LMWorkload:
    unit = "tokens"
    fsdp_units = ("Block",)  # ds-models decoder blocks: one FSDP unit each

    def __init__(self, cfg: TrainConfig, model=None, train_dataset=None, eval_dataset=None):
        self.cfg = cfg
        self.name = "lm"
        self.given_model = model
        self.given_train = train_dataset
        self.given_eval = eval_dataset
        self.teacher = None
        self.lora_stats = None
        self.ce = ce_sum  # replaced by a compiled version with model.compile
        if model is None:
            check_paths(cfg)

    # ---- model and data ----

    def build_model(self, resume_dir: Path | None) -> nn.Module:
        """A checkpoint's weights, else the configured start. LoRA resumes from the base plus the
        checkpoint's adapter, so the adapters and the frozen base stay separate."""
        cfg = self.cfg
        resume_model = resume_dir / "model" if resume_dir and not cfg.lora.enabled else None
        if self.given_model is not None:
            model, self.parent = self.given_model, "given in-memory model"
            if resume_model is not None:  # continue from the checkpoint's weights, not the given ones
                from ds_models import ModelError
                from ds_models.checkpoint import load_weights

                try:  # tensor by tensor into the given model: no second copy of the weights
                    load_weights(model, resume_model)
                except ModelError as e:
                    raise TrainerError(f"the checkpoint's weights do not fit the given model: {e}") from None
        else:
            model, self.parent = load_model(cfg.model, resume_model)
        self.model_config = model.config
        if cfg.lora.enabled:
            self.lora_stats = apply_lora(model, cfg.lora)
            if resume_dir is not None:
                self._load_adapter(model, resume_dir / "adapter" / "adapter_model.safetensors")
        return model

    def build_data(self, accelerator, output_dir: Path, model: nn.Module) -> None:
        """The main process prepares first (tokenizer training, packing cache), the others reuse
        it. Then the distillation teacher: frozen, evaluated in the compute precision."""
        cfg = self.cfg
        if self.given_train is not None:
            self.data = PreparedData(
                self.given_train, self.given_eval, None, {"train": "given in-memory dataset"}
            )
        else:
            tok_dir = next(
                (Path(p) for p in (cfg.model.path, cfg.distill.teacher) if p and Path(p).is_dir()), None
            )
            if accelerator.is_main_process:
                output_dir.mkdir(parents=True, exist_ok=True)
            with accelerator.main_process_first():
                self.data = prepare_data(
                    cfg.data,
                    model_dir=tok_dir,
                    output_dir=output_dir,
                    vocab_size=self.model_config.vocab_size,
                    max_seq_len=self.model_config.max_seq_len,
                )
        self.train, self.eval, self.fingerprints = self.data.train, self.data.eval, self.data.fingerprints
        if cfg.distill.teacher:
            self.teacher, _ = load_model(ModelSpec(path=cfg.distill.teacher))
            self.teacher.eval().requires_grad_(False).to(accelerator.device)
            if self.teacher.config.vocab_size != self.model_config.vocab_size:
                raise TrainerError(
                    f"distill.teacher: vocab_size {self.teacher.config.vocab_size} differs from the "
                    f"student's {self.model_config.vocab_size}"
                )

    def _load_adapter(self, model: nn.Module, path: Path) -> None:
        from safetensors.torch import load_file

        if not path.is_file():
            raise TrainerError(f"{path}: missing from the checkpoint (a LoRA run resumes from its adapter)")
        adapters = load_file(str(path))
        own = adapter_state(model.state_dict())
        if set(adapters) != set(own):
            raise TrainerError(
                f"{path}: adapter tensors do not match lora.target_modules / lora.r of this config"
            )
        model.load_state_dict(adapters, strict=False)

    # ---- batches and the loss ----

    def batch(self, indices: list[int]) -> torch.Tensor:
        return collate(self.train, indices)  # (B, seq_len + 1)

    def weight(self, ids: torch.Tensor) -> int:
        return int((ids[:, 1:] != IGNORE).sum())

    def loss_sum(
        self, model: nn.Module, ids: torch.Tensor, run
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = ids.to(run.device, non_blocking=True)
        inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T)
        logits = model(inputs)  # (B, T, V) float32
        ce = self.ce(logits, targets)
        if self.teacher is None:
            return ce, {}
        with torch.no_grad(), run.accelerator.autocast():
            t_logits = self.teacher(inputs)
        kd = kd_token_sum(logits, t_logits, targets, self.cfg.distill.temperature)
        return self.cfg.distill.alpha * kd + (1 - self.cfg.distill.alpha) * ce, {"ce": ce}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, run) -> dict[str, float] | None:
        if self.eval is None:
            return None
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=run.device)
        for ids in iterate_eval(
            self.eval, self.cfg.data.micro_batch_size, run.world, run.rank, self.cfg.eval.max_batches
        ):
            ids = ids.to(run.device)
            logits = model(ids[:, :-1])
            total[0] += ce_sum(logits, ids[:, 1:]).double()
            total[1] += (ids[:, 1:] != IGNORE).sum()
        if run.world > 1:
            total = run.accelerator.reduce(total, "sum")
        model.train()
        return {"loss": float(total[0] / total[1])} if total[1] > 0 else None

    # ---- the model directory ----

    def write_model_dir(
        self, directory: Path, state: dict[str, torch.Tensor], provenance: dict, live: nn.Module | None
    ) -> None:
        """A plain ds-models model directory from a full state dict (LoRA merged in)."""
        from ds_models import Transformer

        if self.cfg.lora.enabled:
            state = merged_state(state, self.cfg.lora)
        with torch.device("meta"):
            shell = Transformer(self.model_config)
        shell.load_state_dict(state, strict=True, assign=True)
        if self.cfg.distill.teacher:
            provenance = {**provenance, "teacher": self.cfg.distill.teacher}
        shell.save_pretrained(directory, provenance=provenance, tokenizer=self.data.tokenizer)

    def write_checkpoint_extras(self, tmp: Path, state: dict[str, torch.Tensor]) -> None:
        """LoRA: the adapter that training continues from (``model/`` holds the merged weights)."""
        if self.cfg.lora.enabled:
            from safetensors.torch import save_file

            (tmp / "adapter").mkdir()
            save_file({k: v.contiguous() for k, v in adapter_state(state).items()},
                      str(tmp / "adapter" / "adapter_model.safetensors"))  # fmt: skip
