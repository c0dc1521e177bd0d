"""DP-SGD with opacus: per-sample gradient clipping, Gaussian noise, and an RDP accountant.

The privacy unit is one packed training sequence. opacus computes per-sample gradients with
module hooks (nn.Linear, nn.Embedding) and falls back to torch.func (functorch) for modules it
has no hook for, such as the ds RMSNorm; tied embeddings accumulate both uses into one
per-sample gradient. The loss must be a mean over the batch (opacus' ``loss_reduction="mean"``);
the token-normalised loss of packed sequences (every row has the same number of targets) is.

With ``dp.poisson_sampling`` (the default) batches come from opacus' Poisson sampler, which is
what the accountant's guarantee assumes. Without it the trainer keeps its own deterministic,
resumable batches and the reported epsilon is the usual fixed-batch approximation.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ds_trainer.config import DPConfig
from ds_trainer.errors import TrainerError


class _Rows(torch.utils.data.Dataset):
    """Rows of a packed dataset as plain (seq_len + 1,) int64 tensors, the shape opacus' empty-batch
    handling understands."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.as_tensor(self.dataset[int(i)]["input_ids"]).long()  # opacus may pass 0-d tensors


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset,
    batch_size: int,
    total_steps: int,
    config: DPConfig,
    seed: int,
):
    """Wrap model, optimizer and a data loader for DP-SGD; returns (model, optimizer, loader, engine).

    ``batch_size`` is the expected *global* batch. In a process group the model goes through opacus'
    DPDDP (weights broadcast from rank 0), the optimizer becomes its DistributedDPOptimizer (clipped
    per-sample gradients summed over all processes, noise added once, on rank 0) and Poisson
    batches come from its distributed sampler (each process samples its shard of the data at the
    global sample rate), so a step is the same DP-SGD step as in one process at the same batch."""
    try:
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        raise TrainerError("dp.enabled: needs opacus (pip install 'ds-trainer[dp]')") from None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        model = DPDDP(model)
    rows = _Rows(dataset)
    loader = torch.utils.data.DataLoader(
        rows, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(seed)
    )
    noise = config.noise_multiplier
    if config.target_epsilon > 0:
        noise = get_noise_multiplier(
            target_epsilon=config.target_epsilon,
            target_delta=config.delta,
            sample_rate=1 / len(loader),
            steps=total_steps,
            accountant="rdp",
        )
    # opacus hooks every module, including ones whose inputs need no gradient (the embedding's):
    # torch then warns on every backward that the hook sees outputs only, which is expected here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns that secure_mode (a CSPRNG) is off
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=config.poisson_sampling,
            grad_sample_mode="hooks",
        )
    return model, optimizer, loader, engine, noise


def epsilon(engine, delta: float) -> float:
    return float(engine.accountant.get_epsilon(delta=delta)) if len(engine.accountant) else 0.0
