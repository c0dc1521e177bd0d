"""One training run in this process, top to bottom:

  accelerator -> resume check -> workload model -> data -> optimizer, schedule -> prepare (DDP /
  FSDP / DP-SGD) -> restore checkpoint -> loop (accumulate, clip, step, log, eval, checkpoint) ->
  final model directory with provenance.json

The run is the same for every task; what it trains is a *workload*: ``LMWorkload`` (lm.py, the
built-in language model) or ``TaskWorkload`` (tasks.py, a plugin). A workload provides
``build_model(resume_dir)``, ``build_data(accelerator, output_dir, model)`` (sets ``train``,
``eval``, ``fingerprints``), ``batch(indices)``, ``weight(batch)`` (the batch's share of the loss
denominator: target tokens, or examples), ``loss_sum(model, batch, run)`` (loss x weight and
named terms x weight), ``evaluate(model, run)``, ``write_model_dir(...)`` and
``write_checkpoint_extras(...)``. The run divides the summed loss of a step by the summed weight
over the accumulation window and all processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ds_trainer.checkpoint import (
    CheckpointManager,
    find_resume,
    load_state,
    pause_point,
    rng_state,
    save_state,
    set_rng_state,
)
from ds_trainer.config import TrainConfig
from ds_trainer.data import StepBatchSampler
from ds_trainer.errors import TrainerError, is_out_of_memory
from ds_trainer.metrics import MetricsLogger
from ds_trainer.parallel import (
    as_float,
    build_accelerator,
    full_state_dict,
    fully_shard_cpu,
    is_sharded,
    needs_manual_fsdp,
)
from ds_trainer.result import TrainResult
from ds_trainer.schedules import build_scheduler


def build_workload(cfg: TrainConfig, model=None, train_dataset=None, eval_dataset=None):
    if cfg.task == "lm":
        from ds_trainer.lm import LMWorkload

        return LMWorkload(cfg, model, train_dataset, eval_dataset)
    if model is not None or train_dataset is not None:
        raise TrainerError(f"task: {cfg.task}: the task builds its own model and data; pass neither")
    from ds_trainer.tasks import TaskWorkload

    return TaskWorkload(cfg)


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


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("ds-trainer", "ds-data", "accelerate", "peft", "opacus"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


class Run:
    def __init__(self, cfg: TrainConfig, model=None, train_dataset=None, eval_dataset=None):
        self.cfg = cfg
        self.given = (model, train_dataset, eval_dataset)

    # ---- setup ----

    def setup(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.workload = wl = build_workload(cfg, *self.given)
        self.accelerator = acc = build_accelerator(cfg, wl.fsdp_units)
        self.device = acc.device
        self.world = acc.num_processes
        self.rank = acc.process_index
        self.is_main = acc.is_main_process
        self.out = Path(cfg.output_dir)
        if cfg.dp.enabled and cfg.precision.dtype != "fp32":
            raise TrainerError(
                "precision.dtype: DP-SGD needs fp32 (per-sample gradients in low precision are unsafe)"
            )

        # Resume check first: a mismatching config must fail before anything is written.
        self.resume_dir = find_resume(cfg)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last, self.is_main)
        set_seed(cfg.seed)

        model = wl.build_model(self.resume_dir)
        if cfg.model.gradient_checkpointing:
            if not hasattr(model, "set_gradient_checkpointing"):
                raise TrainerError(
                    f"model.gradient_checkpointing: the {wl.name} model has no set_gradient_checkpointing()"
                )
            model.set_gradient_checkpointing(True)
        wl.build_data(acc, self.out, model)
        self.sampler = StepBatchSampler(
            len(wl.train),
            cfg.data.micro_batch_size,
            cfg.data.grad_accum_steps,
            self.world,
            self.rank,
            cfg.seed,
        )
        self.total_steps = cfg.schedule.steps or max(
            1, math.ceil(cfg.schedule.epochs * self.sampler.steps_per_epoch)
        )

        # Optimizer and schedule; then wrap for DDP / FSDP / mixed precision, or for DP-SGD.
        self.manual_fsdp = needs_manual_fsdp(cfg, acc)
        if self.manual_fsdp:
            model = fully_shard_cpu(model, cfg, wl.fsdp_units)  # before the optimizer: it sees the shards
        elif cfg.distributed.strategy != "fsdp":
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
                wl.train,
                cfg.data.micro_batch_size * self.world,  # the expected global batch
                self.total_steps,
                cfg.dp,
                cfg.seed,
            )
            self.model = model
        elif self.manual_fsdp:
            self.model, self.optimizer = model, acc.prepare(self.optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.parallelism = (
            "fsdp2" if is_sharded(self.unwrapped()) else "ddp" if self.world > 1 else "single process"
        )
        if cfg.model.compile:
            # Regional compilation (as torchtitan): every block has the same code, so Inductor
            # compiles one and reuses it; activation checkpointing wraps the compiled blocks.
            base = self.unwrapped()
            blocks = getattr(base, "layers", None)
            for block in blocks if blocks is not None else [base]:
                block.compile()
            if hasattr(wl, "ce"):
                wl.ce = torch.compile(wl.ce)

        self.step = 0
        self.best_eval = math.inf
        self.bad_evals = 0
        self.tokens_seen = 0
        if self.resume_dir is not None:
            self._restore(self.resume_dir)

    def unwrapped(self) -> nn.Module:
        if self.privacy is not None:
            model = self.model._module  # opacus' GradSampleModule holds the model...
            return getattr(model, "module", model)  # ...or its DPDDP wrapper in a process group
        return self.accelerator.unwrap_model(self.model)

    # ---- one optimizer step ----

    def train_step(self, micro_batches: list) -> dict:
        cfg, acc, wl = self.cfg, self.accelerator, self.workload
        # The loss denominator: target tokens (lm) or examples (tasks) in the whole window on all
        # processes.
        n_local = sum(wl.weight(mb) for mb in micro_batches)
        n_global = (
            int(acc.reduce(torch.tensor(n_local, device=self.device), "sum")) if self.world > 1 else n_local
        )
        # DDP / FSDP average gradients over processes; scale so the result is sum(grads) / n_global.
        scale = self.world / max(1, n_global)
        if self.privacy is not None:
            # DP-SGD: the local mean, so that opacus' per-sample gradients (its loss_reduction
            # "mean" multiplies by the local batch size) are exactly each sequence's own; opacus
            # then sums the clipped ones over all processes and divides by the expected batch.
            scale = 1.0 / max(1, n_local)
            if n_local == 0:
                # A Poisson draw left this process empty while others are not: every process
                # must take part in the step, so it backpropagates one row times zero (a per-sample
                # gradient of exactly zero, which adds nothing to the clipped sum).
                micro_batches, scale = [self.workload.batch([0])], 0.0
        loss_total = torch.zeros((), device=self.device)
        term_totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.privacy is not None else acc.no_sync(self.model)
            with sync:
                loss, terms = wl.loss_sum(self.model, batch, self)
                acc.backward(loss * scale)
            if scale == 0.0:
                loss, terms = loss * 0.0, {k: v * 0.0 for k, v in terms.items()}
            loss_total += loss.detach()
            for k, v in terms.items():
                term_totals[k] = term_totals.get(k, torch.zeros((), device=self.device)) + v.detach().float()

        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        grad_norm = None
        if self.privacy is None:
            max_norm = cfg.optim.clip_grad_norm or float("inf")
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16: a step with inf/nan gradients is skipped
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        names = sorted(term_totals)  # the same order on every rank
        sums = torch.stack([loss_total, *(term_totals[k] for k in names)])
        if self.world > 1:
            sums = acc.reduce(sums, "sum")
        sums = (sums / max(1, n_global)).tolist()
        stats = {"loss": sums[0], "tokens": n_global, "lr": lr, **dict(zip(names, sums[1:]))}
        if grad_norm is not None:
            stats["grad_norm"] = as_float(grad_norm)
        return stats

    def evaluate(self) -> dict[str, float] | None:
        return self.workload.evaluate(self.model, self)

    # ---- checkpoints ----

    def _full_state(self) -> dict[str, torch.Tensor]:
        """Collective under FSDP: every rank calls it; the main process gets the tensors."""
        if self.privacy is not None:
            return self.unwrapped().state_dict()
        if self.manual_fsdp:
            return full_state_dict(self.model)
        return self.accelerator.get_state_dict(self.model)

    def _live_model(self) -> nn.Module | None:
        """The trained model itself where this process holds all of it (not sharded)."""
        model = self.unwrapped()
        return None if is_sharded(model) else model

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

    def provenance(self, extra: dict) -> dict:
        return {
            "producer": "ds-train",
            "task": self.workload.name,
            "parent": self.workload.parent,
            "data": self.workload.fingerprints,
            "config": self.cfg.to_dict(),
            "command": " ".join(sys.argv),
            "world_size": self.world,
            "parallelism": self.parallelism,
            "trainer_packages": package_versions(),
            **extra,
        }

    def save_checkpoint(self) -> None:
        state = self._full_state()  # collective under FSDP
        optim_state = self._optimizer_state()
        from accelerate.utils import gather_object

        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        if self.is_main:
            step = self.step
            live = self._live_model()

            def write(tmp: Path) -> None:
                prov = self.provenance({"step": step, "losses_tail": self._tail_losses()})
                self.workload.write_model_dir(tmp / "model", state, prov, live)
                self.workload.write_checkpoint_extras(tmp, state)
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
        saved_batch = pos.get("global_batch", self.sampler.global_batch)
        if saved_batch != self.sampler.global_batch and self.is_main:
            print(
                f"ds-train: {ckpt_dir}: global batch {saved_batch} (checkpoint) -> {self.sampler.global_batch} "
                f"(micro_batch_size x grad_accum_steps x {self.world} processes); the data position carries over",
                file=sys.stderr,
            )
        if self.sampler.offset + self.sampler.global_batch > self.sampler.num_samples:  # global batch grew
            self.sampler.epoch, self.sampler.offset = self.sampler.epoch + 1, 0
        # Every rank continues its own random streams; a group that grew reuses rank 0's.
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    # ---- the loop ----

    def _next_batches(self) -> list:
        if self.dp_loader is not None and self.cfg.dp.poisson_sampling:
            batch = next(self._dp_iter, None)
            if batch is None:
                self._dp_iter = iter(self.dp_loader)
                batch = next(self._dp_iter)
            return [batch]
        return [self.workload.batch(idx) for idx in self.sampler.step_batches()]

    def run(self) -> TrainResult:
        """The whole run; running out of memory anywhere becomes one TrainerError (exit 2), and
        the checkpoint being written when it happened is removed (CheckpointManager.save)."""
        try:
            return self._run()
        except TrainerError:
            raise
        except BaseException as e:
            if not is_out_of_memory(e):
                raise
            where = f"at step {self.step + 1}" if hasattr(self, "step") else "while building the run"
            raise TrainerError(
                f"out of memory {where} ({_oom_detail(e)}) with data.micro_batch_size="
                f"{self.cfg.data.micro_batch_size}: lower data.micro_batch_size (raise data.grad_accum_steps "
                "to keep the batch), set model.gradient_checkpointing=true, or use a smaller model"
            ) from None

    def _run(self) -> TrainResult:
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
        lora_stats = self.workload.lora_stats
        if self.is_main and lora_stats is not None:
            s = lora_stats
            print(
                f"ds-train: LoRA trains {s['trainable']:,} of {s['total']:,} parameters ({100 * s['fraction']:.2f}%)",
                file=sys.stderr,
            )
        self._dp_iter = iter(self.dp_loader) if self.dp_loader is not None else None
        stop_at = min(self.total_steps, cfg.stop_after_steps or self.total_steps)
        unit = self.workload.unit
        eval_loss = None
        stopped_early = False
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.is_main and cfg.logging.progress),
            desc=f"ds-train {self.workload.name}",
            unit="step",
            dynamic_ncols=True,
        )
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < stop_at:
            batches = self._next_batches()
            self.sampler.advance()
            if self.privacy is not None and self.world == 1 and self.workload.weight(batches[0]) == 0:
                self.step += 1  # an empty Poisson batch: nothing to release
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
                    k: v for k, v in stats.items() if k not in ("tokens", "lr", "loss", "grad_norm")
                }  # named loss terms ("ce" when distilling, a task's "loss/...")
                record = {
                    "loss": stats["loss"],
                    "lr": stats["lr"],
                    "grad_norm": stats.get("grad_norm"),
                    f"{unit}_per_second": tps,
                    **record,
                    "epoch": self.sampler.epoch,
                }
                if self.privacy is not None and (self.step % 10 == 0 or self.step == stop_at):
                    from ds_trainer.privacy import epsilon

                    record["epsilon"] = epsilon(self.privacy, cfg.dp.delta)  # costly: not every step
                self.metrics.log(self.step, record)
                short = "tok_s" if unit == "tokens" else "ex_s"
                bar.set_postfix({"loss": f"{stats['loss']:.4f}", short: f"{tps:,.0f}"}, refresh=False)
            bar.update(1)
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                eval_loss = self._eval_and_maybe_stop()
                if self.bad_evals and cfg.eval.patience and self.bad_evals >= cfg.eval.patience:
                    stopped_early = True
                    break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
        bar.close()

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
                if lora_stats is not None:
                    extra["lora"] = {**lora_stats, "merged": True}
                self.workload.write_model_dir(model_dir, state, self.provenance(extra), self._live_model())
        result = TrainResult(
            output_dir=str(self.out),
            model_dir=str(model_dir) if model_dir else None,
            step=self.step,
            total_steps=self.total_steps,
            losses=self.losses,
            eval_loss=eval_loss,
            stopped_early=stopped_early,
            trainable_fraction=lora_stats["fraction"] if lora_stats else None,
            resumed_from=str(self.resume_dir) if self.resume_dir else None,
            world_size=self.world,
            task=self.workload.name,
            parallelism=self.parallelism,
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
        metrics = self.evaluate()
        if not metrics:
            return None
        self.metrics.log(self.step, {f"eval_{k}": v for k, v in metrics.items()})
        loss = metrics.get("loss")
        if loss is None:
            return None
        if loss < self.best_eval - self.cfg.eval.min_delta:
            self.best_eval, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        return loss


def _oom_detail(e: BaseException) -> str:
    """The allocation that failed, in one short clause."""
    import re

    text = str(e)
    m = re.search(r"allocate (\d+) bytes", text) or re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if m:
        amount = m.group(1)
        if amount.isdigit():
            amount = f"{int(amount) / 2**20:,.0f} MiB"
        return f"{'GPU' if isinstance(e, torch.OutOfMemoryError) else 'host'} allocation of {amount} failed"
    return "GPU memory exhausted" if isinstance(e, torch.OutOfMemoryError) else "host memory exhausted"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
