"""Running out of memory is bad input: one line naming what to change, exit 2, no checkpoint or
model directory left behind. Real allocation failures, not mocks: the CLI runs in a subprocess
whose address space is capped with RLIMIT_AS, so the host allocator fails as on a full machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Imports everything a run needs, then caps the address space at what it uses now plus HEADROOM.
CAPPED_CLI = """
import resource, sys
import torch, datasets, tokenizers, accelerate, ds_models, ds_data
import ds_trainer.run
from ds_trainer.cli import main
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        # ~540M parameters (2.1 GB in fp32) do not fit in 1 GiB: the model cannot be built.
        (
            ["model.overrides={d_model: 2048, d_ff: 8192, n_layers: 8, n_heads: 16, n_kv_heads: 16}"],
            "out of memory while building the run (host allocation of",
        ),
        # The model fits, but 128 sequences x 32 tokens x 65536 logits (1 GiB, plus its softmax and
        # gradient) in one micro-batch do not: the first step fails.
        (
            ["model.overrides={vocab_size: 65536}", "data.micro_batch_size=128", "data.grad_accum_steps=1"],
            "out of memory at step 1 (host allocation of",
        ),
    ],
    ids=["model", "step"],
)
def test_out_of_memory_is_one_line_exit_2_and_leaves_no_checkpoint(
    tiny_config, write_config, overrides, where
):
    tiny_config["checkpoint"] = {"every": 1}
    config = write_config(tiny_config)
    proc = subprocess.run(
        [sys.executable, "-c", CAPPED_CLI, str(1 << 30), config, *overrides],
        capture_output=True,
        text=True,
        timeout=240,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert err[-1].startswith("ds-train: error: ") and where in err[-1], err[-1]
    assert "lower data.micro_batch_size" in err[-1] and "Traceback" not in proc.stderr
    out = Path(tiny_config["output_dir"])
    assert not (out / "model").exists()
    ckpts = out / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())
