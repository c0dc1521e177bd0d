"""The ds-train command line.

    ds-train CONFIG [key=value ...]                 train (same as `ds-train train CONFIG ...`)
    ds-train launch CONFIG --nodes 2:4 --gpus-per-node 8 --rdzv-endpoint HOST:PORT [key=value ...]
    ds-train resume OUTPUT_DIR [key=value ...]      continue from the newest complete checkpoint

Exit codes: 0 done, 1 failed, 2 bad input (one line on stderr naming the file, key or flag).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ds_trainer.errors import TrainerError

SUBCOMMANDS = ("train", "launch", "resume")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="ds-train",
        description="Train ds models on HF accelerate: DDP/FSDP, mixed precision, exact resume, LoRA, "
        "distillation, DP-SGD. `ds-train CONFIG [key=value ...]` is short for `ds-train train ...`. "
        "The config's `task:` picks what is trained: lm (default) or a task plugin (entry-point group "
        "ds_trainer.tasks), with its `task_options:`.",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a YAML config plus key=value overrides", formatter_class=fmt)
    p.add_argument("config", help="TrainConfig YAML (see packages/ds-trainer/configs/)")
    p.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3 data.micro_batch_size=4"
    )

    p = sub.add_parser(
        "launch", help="start the run on several processes / nodes through torchrun", formatter_class=fmt
    )
    p.add_argument("config", help="TrainConfig YAML")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    p.add_argument("--nodes", default=None, help="N or an elastic range MIN:MAX (default: the config's)")
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="processes per node (default: the config's)"
    )
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node)")

    p = sub.add_parser(
        "resume", help="continue a run from its newest complete checkpoint", formatter_class=fmt
    )
    p.add_argument("dir", help="the run's output_dir (or a checkpoint inside it)")
    p.add_argument("overrides", nargs="*", help="overrides of keys that do not change the trajectory")
    return parser


def _resume_config(directory: str, overrides: list[str]):
    from ds_trainer.config import TrainConfig

    d = Path(directory)
    if not d.is_dir():
        raise TrainerError(f"{d}: resume directory not found")
    if (d / "train_config.yaml").is_file() and d.name.startswith("step_"):  # a checkpoint directory
        out = d.parent.parent
    elif d.name == "checkpoints":
        out = d.parent
    else:
        out = d
    out = out.resolve()
    config_file = out / "train_config.yaml"
    if not config_file.is_file():
        raise TrainerError(f"{out}: not a ds-train output directory (no train_config.yaml)")
    # The stopped run's stop_after_steps would stop the resume at once: reset it unless given again.
    base = ["stop_after_steps=0", f"output_dir={out}"]
    cfg = TrainConfig.from_yaml(config_file, base + list(overrides))
    from ds_trainer.checkpoint import CheckpointManager

    if CheckpointManager(out / "checkpoints").latest() is None:
        raise TrainerError(f"{out}: no complete checkpoint to resume from")
    return cfg


def run(argv: list[str]) -> int:
    from ds_trainer.config import TrainConfig
    from ds_trainer.trainer import DistributedTrainer

    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv = ["train", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "resume":
        cfg = _resume_config(args.dir, args.overrides)
    else:
        cfg = TrainConfig.from_yaml(args.config, args.overrides)
    changes = {}
    if args.command == "launch":
        if args.nodes is not None:
            changes["distributed.nodes"] = args.nodes
        if args.gpus_per_node is not None:
            changes["distributed.gpus_per_node"] = args.gpus_per_node
        if args.rdzv_endpoint is not None:
            changes["distributed.rdzv_endpoint"] = args.rdzv_endpoint
    if changes:
        changes_flags = {k.removeprefix("distributed.") for k in changes}
        try:
            cfg = cfg.replace(**changes)
        except TrainerError as e:
            key, _, rest = str(e).partition(":")
            if key.startswith("distributed.") and key.removeprefix("distributed.") in changes_flags:
                raise TrainerError(
                    f"--{key.removeprefix('distributed.').replace('_', '-')}: {rest.strip()}"
                ) from None
            raise
    result = DistributedTrainer(cfg).train()
    import torch.distributed as dist

    is_main = (not dist.is_initialized() or dist.get_rank() == 0) and "DS_TRAIN_LAUNCHED" not in os.environ
    if is_main:
        last = result.losses.get(result.step)
        parts = [f"step {result.step}/{result.total_steps}"]
        if last is not None:
            parts.append(f"loss {last:.4f}")
        if result.eval_loss is not None:
            parts.append(f"eval_loss {result.eval_loss:.4f}")
        if result.trainable_fraction is not None:
            parts.append(f"LoRA trainable {100 * result.trainable_fraction:.2f}%")
        if result.epsilon is not None:
            parts.append(f"DP epsilon {result.epsilon:.2f} at delta {cfg.dp.delta:g}")
        if result.stopped_early:
            parts.append("stopped early (eval loss stopped improving)")
        where = (
            f"model: {result.model_dir}"
            if result.model_dir
            else f"checkpoint in {result.output_dir}/checkpoints"
        )
        print(f"ds-train: done: {', '.join(parts)}; {where}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except TrainerError as e:
        print(f"ds-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ds-train: interrupted", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if str(e).startswith("ds-train:"):
            print(str(e), file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
