"""Self-launch: when a run asks for more processes than the current process group has, build the
``torchrun`` command that starts them and run it.

- One node: ``torchrun --standalone --nproc_per_node G`` (a private rendezvous on a free port).
- Several nodes: ``torchrun --nnodes MIN:MAX --nproc_per_node G --rdzv-backend c10d
  --rdzv-endpoint HOST:PORT``. The command is printed, to be run on every node; this node runs it
  too. A MIN:MAX range makes the job elastic: it starts once MIN nodes have joined, takes nodes up
  to MAX, and with ``--max-restarts`` survives nodes leaving. The data position and the loss
  normalisation are defined on the global batch, so a restarted group resumes from the last
  checkpoint whatever its size.

The children run ``python -m ds_trainer.cli train CONFIG`` on the resolved config written to the
output directory; they see ``LOCAL_RANK`` in their environment and so run instead of launching.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from ds_trainer.config import TrainConfig


def in_process_group() -> bool:
    """True inside processes started by torchrun / accelerate launch / srun wrappers."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_launch(config: TrainConfig) -> bool:
    _, hi = config.distributed.node_range()
    return not in_process_group() and (hi > 1 or config.distributed.gpus_per_node > 1)


def torchrun_command(config: TrainConfig, config_path: str | os.PathLike) -> list[str]:
    d = config.distributed
    lo, hi = d.node_range()
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if hi == 1:
        cmd += ["--standalone", "--nproc_per_node", str(d.gpus_per_node)]
    else:
        cmd += [
            "--nnodes", d.nodes if lo != hi else str(lo),
            "--nproc_per_node", str(d.gpus_per_node),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", d.rdzv_endpoint,
            "--rdzv-id", d.rdzv_id,
        ]  # fmt: skip
    if d.max_restarts:
        cmd += ["--max-restarts", str(d.max_restarts)]
    return [*cmd, "-m", "ds_trainer.cli", "train", str(config_path)]


def launch(config: TrainConfig) -> int:
    """Write the resolved config next to the run and start the process group; returns its exit code."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = (out / "launch_config.yaml").resolve()
    config.to_yaml(config_path)
    cmd = torchrun_command(config, config_path)
    _, hi = config.distributed.node_range()
    shown = shlex.join(["torchrun", *cmd[3:]])
    if hi > 1:
        print(
            f"ds-train: multi-node run; start this on every node (output_dir must be on a shared filesystem):\n"
            f"  {shown}",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            f"ds-train: launching {config.distributed.gpus_per_node} processes: {shown}",
            file=sys.stderr,
            flush=True,
        )
    env = dict(os.environ)
    env["DS_TRAIN_LAUNCHED"] = "1"  # the children leave the summary line to this process
    # The children must import the same ds_trainer as this process (editable installs, PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return subprocess.run(cmd, env=env).returncode
