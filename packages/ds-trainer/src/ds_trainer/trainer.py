"""DistributedTrainer: one training run on HF accelerate, top to bottom.

    DistributedTrainer(config | model_path=..., gpus_per_node=..., nodes=..., **overrides).train(epochs=... | steps=...)

In a single process it trains. Asked for more processes than the current group has, it launches
itself through torchrun (launch.py) and reads the result back. A run goes:

  accelerator -> resume check -> model (+ LoRA) -> data -> teacher -> optimizer, schedule ->
  prepare (DDP / FSDP / DP-SGD) -> restore checkpoint -> loop (accumulate, clip, step, log, eval,
  checkpoint) -> final model directory with provenance.json

The loss of an optimizer step is the sum of token losses over the whole accumulation window and
all processes divided by the number of target tokens in it, not a mean of per-micro-batch means:
every token weighs the same however the batch is split, which is what lets a 2-process run match
a 1-process run at the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_trainer import launch
from ds_trainer.checkpoint import (
    CheckpointManager,
    load_state,
    pause_point,
    rng_state,
    save_state,
    set_rng_state,
)
from ds_trainer.config import ModelSpec, TrainConfig
from ds_trainer.data import PreparedData, StepBatchSampler, collate, iterate_eval, prepare_data
from ds_trainer.distill import kd_token_sum, stage_specs
from ds_trainer.errors import TrainerError
from ds_trainer.lora import adapter_state, apply_lora, merged_state
from ds_trainer.metrics import MetricsLogger
from ds_trainer.schedules import build_scheduler

IGNORE = -100


@dataclass
class TrainResult:
    output_dir: str
    model_dir: str | None  # the final model directory (None when the run stopped early by request)
    step: int  # optimizer steps done
    total_steps: int
    losses: dict[int, float]  # step -> training loss
    eval_loss: float | None = None
    stopped_early: bool = False
    epsilon: float | None = None  # DP-SGD: privacy spent, for dp.delta
    trainable_fraction: float | None = None  # LoRA
    resumed_from: str | None = None
    world_size: int = 1  # processes that trained
    stages: list[dict] = field(default_factory=list)  # progressive distillation

    def to_json(self) -> dict:
        d = asdict(self)
        d["losses"] = {str(k): v for k, v in self.losses.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainResult:
        d = dict(d)
        d["losses"] = {int(k): v for k, v in d["losses"].items()}
        return cls(**d)


class DistributedTrainer:
    def __init__(
        self,
        config: TrainConfig | str | os.PathLike | dict | None = None,
        *,
        model_path: str | None = None,
        gpus_per_node: int | None = None,
        nodes: int | str | None = None,
        model: nn.Module | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        **overrides: Any,
    ):
        """``config``: a TrainConfig, a YAML path or a dict. Keyword overrides use ``__`` for the
        dot: ``DistributedTrainer("small.yaml", optim__lr=1e-3)``. ``model`` / ``train_dataset``
        (rows of ``{"input_ids": (seq_len + 1,)}``) replace what the config would build, for
        callers such as ds-multimodal and the benchmarks."""
        if config is None:
            cfg = TrainConfig()
        elif isinstance(config, TrainConfig):
            cfg = config
        elif isinstance(config, dict):
            cfg = TrainConfig.from_dict(config)
        else:
            cfg = TrainConfig.from_yaml(config)
        changes: dict[str, Any] = {k.replace("__", "."): v for k, v in overrides.items()}
        if model_path is not None:
            changes["model.path"] = str(model_path)
        if gpus_per_node is not None:
            changes["distributed.gpus_per_node"] = gpus_per_node
        if nodes is not None:
            changes["distributed.nodes"] = str(nodes)
        self.config = cfg.replace(**changes) if changes else cfg
        self.model = model
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset

    def train(self, *, epochs: float | None = None, steps: int | None = None) -> TrainResult:
        cfg = self.config
        if epochs is not None:
            cfg = cfg.replace(**{"schedule.epochs": epochs, "schedule.steps": 0})
        if steps is not None:
            cfg = cfg.replace(**{"schedule.steps": steps})
        if cfg.distill.stages:
            return _train_chain(cfg)
        if launch.needs_launch(cfg):
            if self.model is not None or self.train_dataset is not None:
                raise TrainerError(
                    "distributed: objects passed to DistributedTrainer cannot travel to launched processes; "
                    "start the script with torchrun instead"
                )
            _check_paths(cfg)  # bad input fails here, before any process starts
            find_resume(cfg)
            gpus = torch.cuda.device_count()
            if gpus and not cfg.distributed.cpu and cfg.distributed.gpus_per_node > gpus:
                raise TrainerError(
                    f"distributed.gpus_per_node: {cfg.distributed.gpus_per_node} processes, but this node has "
                    f"{gpus} GPUs (set distributed.cpu=true to run CPU processes)"
                )
            rc = launch.launch(cfg)
            result_path = Path(cfg.output_dir) / "result.json"
            if rc != 0:
                raise RuntimeError(f"ds-train: the launched processes failed with exit code {rc}")
            return TrainResult.from_json(json.loads(result_path.read_text()))
        return _Run(cfg, self.model, self.train_dataset, self.eval_dataset).run()


def _train_chain(cfg: TrainConfig) -> TrainResult:
    """Progressive distillation: each stage's model is the next stage's teacher."""
    results = []
    for spec in stage_specs(cfg.distill.teacher, cfg.distill.stages, cfg.output_dir):
        stage_cfg = cfg.replace(
            **{
                "model.path": spec["model"],
                "model.overrides": spec["overrides"],
                "distill.teacher": spec["teacher"],
                "distill.stages": [],
                "schedule.steps": spec["steps"],
                "output_dir": spec["output_dir"],
            }
        )
        results.append(DistributedTrainer(stage_cfg).train())
    last = results[-1]
    last.stages = [
        {"model": s["model"], "teacher": s["teacher"], "output_dir": r.output_dir, "model_dir": r.model_dir,
         "final_loss": r.losses[max(r.losses)] if r.losses else None, "eval_loss": r.eval_loss}
        for s, r in zip(stage_specs(cfg.distill.teacher, cfg.distill.stages, cfg.output_dir), results)
    ]  # fmt: skip
    return last


# --- building blocks -------------------------------------------------------------------------------


def _check_paths(cfg: TrainConfig) -> None:
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


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import AORecipeKwargs, TERecipeKwargs

    use_cpu = cfg.distributed.cpu or not torch.cuda.is_available()
    dtype = cfg.precision.dtype
    kwargs: dict[str, Any] = {}
    if dtype in ("fp16", "fp8") and use_cpu:
        raise TrainerError(f"precision.dtype: {dtype} needs a CUDA GPU; use bf16 or fp32 on CPU")
    if dtype == "fp8":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise TrainerError(
                f"precision.dtype: fp8 needs compute capability >= 8.9 (Ada, Hopper); this GPU has {major}.{minor}"
            )
        import importlib.util

        have_te = importlib.util.find_spec("transformer_engine") is not None
        have_ao = importlib.util.find_spec("torchao") is not None
        backend = cfg.precision.fp8_backend
        if backend == "auto":
            backend = "te" if have_te else "torchao" if have_ao else ""
        if backend == "te" and have_te:
            kwargs["kwargs_handlers"] = [TERecipeKwargs()]
        elif backend == "torchao" and have_ao:
            kwargs["kwargs_handlers"] = [AORecipeKwargs()]
        else:
            raise TrainerError(
                "precision.dtype: fp8 needs torchao (pip install torchao) or TransformerEngine; neither is installed"
            )
    if cfg.distributed.strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=cfg.distributed.fsdp_reshard_after_forward,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Block"],
            state_dict_type="FULL_STATE_DICT",
        )
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}[dtype]
    # accelerate keeps one AcceleratorState per process; a second run in the same process (a
    # distillation chain, a notebook, tests) may want other precision, so start it afresh while
    # keeping the process group (PartialState).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=use_cpu, mixed_precision=precision, **kwargs)


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


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    # No weight decay on norms and biases (1-D), as in GPT-2 / Llama recipes.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    fused = o.fused == "yes" or (o.fused == "auto" and device.type == "cuda")
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("ds-trainer", "ds-data", "accelerate", "peft", "opacus"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _config_diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    a, b = old.trajectory_dict(), new.trajectory_dict()
    return [
        f"{k}: {a.get(k)!r} (checkpoint) != {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def find_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from; raises when it was written by a different config."""
    manager = CheckpointManager(Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.keep_last)
    latest = manager.latest()
    if latest is None:
        return None
    if cfg.checkpoint.resume == "never":
        raise TrainerError(
            f"checkpoint.resume: never, but {cfg.output_dir} holds checkpoints of an earlier run "
            "(use another output_dir or checkpoint.resume=auto)"
        )
    saved_path = latest / "train_config.yaml"
    saved = TrainConfig.from_yaml(saved_path)
    diff = _config_diff(saved, cfg)
    if diff:
        raise TrainerError(f"{saved_path}: resume directory was written by a different config: {diff[0]}")
    return latest


# --- the run -----------------------------------------------------------------------------------------


class _Run:
    def __init__(self, cfg: TrainConfig, model=None, train_dataset=None, eval_dataset=None):
        self.cfg = cfg
        self.given_model = model
        self.given_train = train_dataset
        self.given_eval = eval_dataset

    # ---- setup ----

    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        if self.given_model is None:
            _check_paths(cfg)
        self.accelerator = acc = build_accelerator(cfg)
        self.device = acc.device
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.is_main = acc.is_main_process
        self.out = Path(cfg.output_dir)
        if cfg.dp.enabled and self.world > 1:
            raise TrainerError(
                "dp.enabled: DP-SGD runs in one process in this release (distributed.gpus_per_node=1)"
            )
        if cfg.dp.enabled and cfg.precision.dtype != "fp32":
            raise TrainerError(
                "precision.dtype: DP-SGD needs fp32 (per-sample gradients in low precision are unsafe)"
            )

        # Resume check first: a mismatching config must fail before anything is written.
        self.resume_dir = find_resume(cfg)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last, self.is_main)
        set_seed(cfg.seed)

        # Model: a checkpoint's weights, else the configured start. LoRA resumes from the base plus
        # the checkpoint's adapter, so the adapters and the frozen base stay separate.
        resume_model = self.resume_dir / "model" if self.resume_dir and not cfg.lora.enabled else None
        if self.given_model is not None:
            model, self.parent = self.given_model, "given in-memory model"
        else:
            model, self.parent = load_model(cfg.model, resume_model)
        self.model_config = model.config
        self.lora_stats = None
        if cfg.lora.enabled:
            self.lora_stats = apply_lora(model, cfg.lora)
            if self.resume_dir is not None:
                self._load_adapter(model, self.resume_dir / "adapter" / "adapter_model.safetensors")
        if cfg.model.gradient_checkpointing:
            model.set_gradient_checkpointing(True)

        # Data: the main process prepares first (tokenizer training, packing cache), the others reuse it.
        if self.given_train is not None:
            self.data = PreparedData(
                self.given_train, self.given_eval, None, {"train": "given in-memory dataset"}
            )
        else:
            tok_dir = next(
                (Path(p) for p in (cfg.model.path, cfg.distill.teacher) if p and Path(p).is_dir()), None
            )
            if self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
            with acc.main_process_first():
                self.data = prepare_data(
                    cfg.data,
                    model_dir=tok_dir,
                    output_dir=self.out,
                    vocab_size=self.model_config.vocab_size,
                    max_seq_len=self.model_config.max_seq_len,
                )
        self.sampler = StepBatchSampler(
            len(self.data.train),
            cfg.data.micro_batch_size,
            cfg.data.grad_accum_steps,
            self.world,
            self.rank,
            cfg.seed,
        )
        self.total_steps = cfg.schedule.steps or max(
            1, math.ceil(cfg.schedule.epochs * self.sampler.steps_per_epoch)
        )

        # Teacher for distillation: frozen, evaluated in the compute precision.
        self.teacher = None
        if cfg.distill.teacher:
            self.teacher, _ = load_model(ModelSpec(path=cfg.distill.teacher))
            self.teacher.eval().requires_grad_(False).to(self.device)
            if self.teacher.config.vocab_size != self.model_config.vocab_size:
                raise TrainerError(
                    f"distill.teacher: vocab_size {self.teacher.config.vocab_size} differs from the "
                    f"student's {self.model_config.vocab_size}"
                )

        # Optimizer and schedule; then wrap for DDP / FSDP / mixed precision, or for DP-SGD.
        if cfg.distributed.strategy != "fsdp":
            model.to(self.device)  # before the optimizer: fused AdamW wants its parameters on the GPU
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps)
        self.privacy = None
        self.dp_loader = None
        if cfg.dp.enabled:
            from ds_trainer.privacy import make_private

            model.to(self.device)
            model, self.optimizer, self.dp_loader, self.privacy, self.noise = make_private(
                model,
                self.optimizer,
                self.data.train,
                cfg.data.micro_batch_size,
                self.total_steps,
                cfg.dp,
                cfg.seed,
            )
            self.model = model
        else:
            self.model, self.optimizer = acc.prepare(model, self.optimizer)
        if cfg.model.compile:
            # Regional compilation (as torchtitan): every block has the same code, so Inductor
            # compiles one and reuses it; activation checkpointing wraps the compiled blocks.
            base = self.unwrapped()
            blocks = getattr(base, "layers", None)
            for block in blocks if blocks is not None else [base]:
                block.compile()
            self._ce = torch.compile(_ce_sum)
        else:
            self._ce = _ce_sum

        self.step = 0
        self.best_eval = math.inf
        self.bad_evals = 0
        self.tokens_seen = 0
        if self.resume_dir is not None:
            self._restore(self.resume_dir)

    def unwrapped(self) -> nn.Module:
        model = self.model
        if self.privacy is not None:
            return model._module
        return self.accelerator.unwrap_model(model)

    # ---- one optimizer step ----

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict:
        cfg, acc = self.cfg, self.accelerator
        # Target tokens in the whole window on all processes: the loss denominator.
        n_local = sum(int((mb[:, 1:] != IGNORE).sum()) for mb in micro_batches)
        n_global = (
            int(acc.reduce(torch.tensor(n_local, device=self.device), "sum")) if self.world > 1 else n_local
        )
        # DDP averages gradients over processes; scale so the result is sum(token grads) / n_global.
        scale = self.world / max(1, n_global)
        loss_sum = torch.zeros((), device=self.device)
        ce_total = torch.zeros((), device=self.device)
        for i, ids in enumerate(micro_batches):
            ids = ids.to(self.device, non_blocking=True)
            inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.privacy is not None else acc.no_sync(self.model)
            with sync:
                logits = self.model(inputs)  # (B, T, V) float32
                ce = self._ce(logits, targets)
                loss = ce
                if self.teacher is not None:
                    with torch.no_grad(), acc.autocast():
                        t_logits = self.teacher(inputs)
                    kd = kd_token_sum(logits, t_logits, targets, cfg.distill.temperature)
                    loss = cfg.distill.alpha * kd + (1 - cfg.distill.alpha) * ce
                acc.backward(loss * scale)
            loss_sum += loss.detach()
            ce_total += ce.detach()

        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        grad_norm = None
        if self.privacy is None:
            max_norm = cfg.optim.clip_grad_norm or float("inf")
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16: a step with inf/nan gradients is skipped
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        sums = torch.stack([loss_sum, ce_total])
        if self.world > 1:
            sums = acc.reduce(sums, "sum")
        sums = (sums / max(1, n_global)).tolist()
        stats = {"loss": sums[0], "tokens": n_global, "lr": lr}
        if self.teacher is not None:
            stats["ce"] = sums[1]
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
        return stats

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.data.eval is None:
            return None
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for ids in iterate_eval(
            self.data.eval, self.cfg.data.micro_batch_size, self.world, self.rank, self.cfg.eval.max_batches
        ):
            ids = ids.to(self.device)
            logits = self.model(ids[:, :-1])
            total[0] += _ce_sum(logits, ids[:, 1:]).double()
            total[1] += (ids[:, 1:] != IGNORE).sum()
        if self.world > 1:
            total = self.accelerator.reduce(total, "sum")
        self.model.train()
        return float(total[0] / total[1]) if total[1] > 0 else None

    # ---- checkpoints ----

    def _full_state(self) -> dict[str, torch.Tensor]:
        if self.privacy is not None:
            return self.unwrapped().state_dict()
        return self.accelerator.get_state_dict(self.model)

    def _optimizer_state(self) -> dict:
        if self.cfg.distributed.strategy == "fsdp" and self.privacy is None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.model,
                self.optimizer.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        return self.optimizer.state_dict()

    def _trainer_state(self) -> dict:
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "data": {**self.sampler.position(), "global_batch": self.sampler.global_batch},
            "scheduler": self.scheduler.state_dict(),
            "best_eval": self.best_eval,
            "bad_evals": self.bad_evals,
            "tokens_seen": self.tokens_seen,
        }
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        if self.privacy is not None:
            state["dp_accountant"] = self.privacy.accountant.state_dict()
        return state

    def write_model_dir(self, directory: Path, state: dict[str, torch.Tensor], extra: dict) -> None:
        """A plain ds-models model directory from a full state dict (LoRA merged in)."""
        from ds_models import Transformer

        if self.cfg.lora.enabled:
            state = merged_state(state, self.cfg.lora)
        with torch.device("meta"):
            shell = Transformer(self.model_config)
        shell.load_state_dict(state, strict=True, assign=True)
        provenance = {
            "producer": "ds-train",
            "parent": self.parent,
            "data": self.data.fingerprints,
            "config": self.cfg.to_dict(),
            "command": " ".join(sys.argv),
            "world_size": self.world,
            "trainer_packages": _package_versions(),
            **extra,
        }
        if self.cfg.distill.teacher:
            provenance["teacher"] = self.cfg.distill.teacher
        tokenizer = self.data.tokenizer
        shell.save_pretrained(directory, provenance=provenance, tokenizer=tokenizer)

    def save_checkpoint(self) -> None:
        state = self._full_state()  # collective under FSDP
        optim_state = self._optimizer_state()
        from accelerate.utils import gather_object

        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        if self.is_main:
            step = self.step

            def write(tmp: Path) -> None:
                self.write_model_dir(tmp / "model", state, {"step": step, "losses_tail": self._tail_losses()})
                if self.cfg.lora.enabled:
                    from safetensors.torch import save_file

                    (tmp / "adapter").mkdir()
                    save_file({k: v.contiguous() for k, v in adapter_state(state).items()},
                              str(tmp / "adapter" / "adapter_model.safetensors"))  # fmt: skip
                pause_point(step)
                save_state(tmp / "optimizer.pt", optim_state)
                save_state(tmp / "trainer_state.pt", self._trainer_state())
                save_state(tmp / "rng.pt", rngs)
                self.cfg.to_yaml(tmp / "train_config.yaml")

            self.ckpt.save(step, write)
        self.accelerator.wait_for_everyone()
        self.last_saved = self.step

    def _tail_losses(self) -> list[float]:
        return [self.losses[s] for s in sorted(self.losses)[-5:]]

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

    def _restore(self, ckpt_dir: Path) -> None:
        st = load_state(ckpt_dir / "trainer_state.pt")
        optim_state = load_state(ckpt_dir / "optimizer.pt")
        rngs = load_state(ckpt_dir / "rng.pt")
        if self.cfg.distributed.strategy == "fsdp" and self.privacy is None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model,
                self.optimizer.optimizer,
                optim_state,
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(st["scheduler"])
        if "scaler" in st and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(st["scaler"])
        if "dp_accountant" in st and self.privacy is not None:
            self.privacy.accountant.load_state_dict(st["dp_accountant"])
        self.step = st["step"]
        self.best_eval, self.bad_evals = st["best_eval"], st["bad_evals"]
        self.tokens_seen = st["tokens_seen"]
        pos = st["data"]
        self.sampler.epoch, self.sampler.offset = pos["epoch"], pos["offset"]
        if self.sampler.offset + self.sampler.global_batch > self.sampler.num_samples:  # global batch changed
            self.sampler.epoch, self.sampler.offset = self.sampler.epoch + 1, 0
        # Every rank continues its own random streams; a group that grew reuses rank 0's.
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    # ---- the loop ----

    def _next_batches(self) -> list[torch.Tensor]:
        if self.dp_loader is not None and self.cfg.dp.poisson_sampling:
            batch = next(self._dp_iter, None)
            if batch is None:
                self._dp_iter = iter(self.dp_loader)
                batch = next(self._dp_iter)
            return [batch]
        return [collate(self.data.train, idx) for idx in self.sampler.step_batches()]

    def run(self) -> TrainResult:
        self.setup()
        cfg, acc = self.cfg, self.accelerator
        self.losses: dict[int, float] = {}
        self.last_saved = self.step if self.resume_dir is not None else -1
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt.remove_partial()
            cfg.to_yaml(self.out / "train_config.yaml")
        acc.wait_for_everyone()
        self.metrics = MetricsLogger(
            self.out,
            cfg.logging,
            is_main=self.is_main,
            is_local_main=acc.is_local_main_process,
            device=self.device,
            resume=self.resume_dir is not None,
        )
        if self.is_main and self.lora_stats is not None:
            s = self.lora_stats
            print(
                f"ds-train: LoRA trains {s['trainable']:,} of {s['total']:,} parameters ({100 * s['fraction']:.2f}%)",
                file=sys.stderr,
            )
        self._dp_iter = iter(self.dp_loader) if self.dp_loader is not None else None
        stop_at = min(self.total_steps, cfg.stop_after_steps or self.total_steps)
        eval_loss = None
        stopped_early = False
        try:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                disable=not (self.is_main and cfg.logging.progress),
                desc="ds-train",
                unit="step",
                dynamic_ncols=True,
            )
            window_tokens, window_start = 0, time.perf_counter()
            while self.step < stop_at:
                batches = self._next_batches()
                self.sampler.advance()
                if batches[0].shape[0] == 0:  # an empty Poisson batch: nothing to release
                    self.step += 1
                    continue
                stats = self.train_step(batches)
                self.step += 1
                self.tokens_seen += stats["tokens"]
                window_tokens += stats["tokens"]
                self.losses[self.step] = stats["loss"]
                if self.step % cfg.logging.every == 0 or self.step == stop_at:
                    now = time.perf_counter()
                    tps = window_tokens / max(1e-9, now - window_start)
                    window_tokens, window_start = 0, now
                    record = {
                        "loss": stats["loss"],
                        "lr": stats["lr"],
                        "grad_norm": stats.get("grad_norm"),
                        "tokens_per_second": tps,
                        "ce": stats.get("ce"),
                        "epoch": self.sampler.epoch,
                    }
                    if self.privacy is not None and (self.step % 10 == 0 or self.step == stop_at):
                        from ds_trainer.privacy import epsilon

                        record["epsilon"] = epsilon(self.privacy, cfg.dp.delta)  # costly: not every step
                    self.metrics.log(self.step, record)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                bar.update(1)
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    eval_loss = self._eval_and_maybe_stop()
                    if self.bad_evals and cfg.eval.patience and self.bad_evals >= cfg.eval.patience:
                        stopped_early = True
                        break
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
            bar.close()
        except torch.OutOfMemoryError:
            raise TrainerError(
                f"out of memory at step {self.step + 1} with data.micro_batch_size={cfg.data.micro_batch_size} "
                f"and data.seq_len={cfg.data.seq_len}: lower data.micro_batch_size (raise data.grad_accum_steps "
                "to keep the batch) or set model.gradient_checkpointing=true"
            ) from None

        finished = self.step >= self.total_steps or stopped_early
        if self.last_saved != self.step:
            self.save_checkpoint()
        model_dir = None
        if finished:
            if not (cfg.eval.every and self.step % cfg.eval.every == 0):
                eval_loss = self._eval_and_maybe_stop()
            model_dir = self.out / "model"
            state = self._full_state()
            if self.is_main:
                extra = {"steps": self.step, "final_loss": self.losses.get(self.step), "eval_loss": eval_loss}
                if self.privacy is not None:
                    from ds_trainer.privacy import epsilon

                    extra["dp"] = {"epsilon": epsilon(self.privacy, cfg.dp.delta), "delta": cfg.dp.delta,
                                   "noise_multiplier": self.noise, "max_grad_norm": cfg.dp.max_grad_norm}  # fmt: skip
                if self.lora_stats is not None:
                    extra["lora"] = {**self.lora_stats, "merged": True}
                self.write_model_dir(model_dir, state, extra)
        result = TrainResult(
            output_dir=str(self.out),
            model_dir=str(model_dir) if model_dir else None,
            step=self.step,
            total_steps=self.total_steps,
            losses=self.losses,
            eval_loss=eval_loss,
            stopped_early=stopped_early,
            trainable_fraction=self.lora_stats["fraction"] if self.lora_stats else None,
            resumed_from=str(self.resume_dir) if self.resume_dir else None,
            world_size=self.world,
        )
        if self.privacy is not None:
            from ds_trainer.privacy import epsilon

            result.epsilon = epsilon(self.privacy, cfg.dp.delta)
        if self.is_main:
            _write_json(self.out / "result.json", result.to_json())
        self.metrics.close()
        acc.wait_for_everyone()
        return result

    def _eval_and_maybe_stop(self) -> float | None:
        loss = self.evaluate()
        if loss is None:
            return None
        if loss < self.best_eval - self.cfg.eval.min_delta:
            self.best_eval, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        self.metrics.log(self.step, {"eval_loss": loss})
        return loss


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies; logits (B, T, V), targets (B, T) with -100 ignored."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
