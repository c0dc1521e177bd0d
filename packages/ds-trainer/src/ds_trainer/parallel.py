"""How a run spreads over processes and devices: the accelerate ``Accelerator`` (precision, DDP, the
FSDP plugin) and FSDP2 on CPU process groups.

FSDP on CPU: accelerate (1.15) turns its ``fsdp_plugin`` on only for GPU-like distributed types
(``AcceleratorState`` switches ``MULTI_GPU``/``MULTI_XPU``/... to ``FSDP``); on a gloo CPU group the
type stays ``MULTI_CPU`` and ``prepare`` wraps the model in DDP, silently. PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``) itself runs on a CPU device mesh over gloo, so for
``distributed.strategy: fsdp`` on CPU the run shards the model here, the same way accelerate does
on GPUs (one unit per decoder block, then the root), and leaves only the optimizer to accelerate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ds_trainer.config import TrainConfig
from ds_trainer.errors import TrainerError


def build_accelerator(cfg: TrainConfig, fsdp_units: list[str]):
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
    if cfg.distributed.strategy == "fsdp" and not use_cpu:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=cfg.distributed.fsdp_reshard_after_forward,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=list(fsdp_units),
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


def needs_manual_fsdp(cfg: TrainConfig, accelerator) -> bool:
    """strategy fsdp on a multi-process CPU group, where accelerate would fall back to DDP."""
    from accelerate.utils import DistributedType

    return (
        cfg.distributed.strategy == "fsdp"
        and accelerator.num_processes > 1
        and accelerator.distributed_type == DistributedType.MULTI_CPU
    )


def fully_shard_cpu(model: nn.Module, cfg: TrainConfig, units: list[str]) -> nn.Module:
    """FSDP2 over the CPU group: each module whose class is named in ``units`` is one unit, the
    root takes the rest. bf16 autocasts the forward, as accelerate's prepare does on GPUs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    reshard = cfg.distributed.fsdp_reshard_after_forward
    for module in list(model.modules())[1:]:
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    if cfg.precision.dtype == "bf16":
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the main process (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def as_float(value: Any) -> float:
    """A grad norm as a float (FSDP2 returns a replicated DTensor)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)
