"""Tensor-parallel inference: one ds model split across the devices of a 1-D mesh (torch DTensor).

The plan is Megatron's, as torchtitan writes it with `parallelize_module`: in every block q/k/v and
gate/up are split by output features (ColwiseParallel: a rank holds n_heads/tp query heads,
n_kv_heads/tp kv heads and d_ff/tp neurons), o/down by input features (RowwiseParallel: each rank's
partial sum is all-reduced), so a block costs two all-reduces of (B, T, d_model) and attention runs
on local heads with no communication. `lm_head` is vocab-parallel (ColwiseParallel, the logits
all-gathered) unless it is tied to the embedding. `embed_tokens` and the RMSNorms are replicated: a
decode step reads one embedding row per token, so sharding the table would save memory only (1.7 GB
of ds-67b in bf16) and cost one more all-reduce per step. A tied lm_head stays replicated with it.

Large models are never materialised whole: `build_parallel` builds on the meta device, shards, then
allocates only each rank's shards (`to_empty`) and runs the registry init on them. `load_parallel`
builds the same way and fills the shards from a model directory, each rank reading only its own
slices of the sharded weights (safetensors reads by slice) plus the replicated tensors.

Decoding (`ParallelDecoder`, `generate_parallel`) reuses the model's own `hidden` with a KVCache of
the rank's local kv heads; generate()'s graph modes fuse q/k/v into one buffer, which does not apply
to sharded weights, so the loop lives here. A step runs eagerly or captured in a CUDA graph (the
NCCL all-reduces are captured with it): DTensor dispatch costs ~0.1 ms of host time per sharded
Linear, which the graph removes.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ds_models import KVCache, ModelConfig, ModelError, Transformer, sample
from ds_models.checkpoint import load_weights, read_config, stored_dtype
from ds_models.generate import check_arguments, left_pad
from ds_models.model import Attention

MODES = ("auto", "eager", "cuda-graph")

# The mesh of every sharded model (tensor_parallel), without adding state to the module.
_MESHES: weakref.WeakKeyDictionary[Transformer, DeviceMesh] = weakref.WeakKeyDictionary()

# Module paths inside one Block and how each is split.
BLOCK_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def check_tp_size(config: ModelConfig, tp: int) -> None:
    """Raise ModelError unless `config` can be split `tp` ways by heads."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ModelError(f"tensor-parallel size: expected a positive integer, got {tp!r}")
    for name in ("n_heads", "n_kv_heads"):
        value = getattr(config, name)
        if value % tp:
            raise ModelError(
                f"{name}: {value} is not divisible by the tensor-parallel size {tp} "
                f"(every rank holds {name}/tp whole heads; use a size dividing {config.n_kv_heads})"
            )
    if config.sparse_ratio > 0 or config.attention_sparse_ratio > 0:
        # ds_core's sparse MLP reads its weights directly (packed copies), not through the Linears.
        raise ModelError(
            "sparse_ratio / attention_sparse_ratio: tensor parallelism supports dense models only "
            f"(got {config.sparse_ratio} / {config.attention_sparse_ratio})"
        )


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's share of attention: n_heads, n_kv_heads and d_model divided by tp.

    head_dim (d_model / n_heads) is unchanged. Only the KV cache reads it: (B, n_kv_heads/tp, S, D).
    """
    check_tp_size(config, tp)
    return dataclasses.replace(
        config, n_heads=config.n_heads // tp, n_kv_heads=config.n_kv_heads // tp, d_model=config.d_model // tp
    )


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """This rank's device in `mesh` (CUDA: the current device, set by the caller)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def tensor_parallel(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard `model` in place over the 1-D `mesh` (module docstring) and return it.

    The model may live on the meta device (then `build_parallel` allocates it) or hold real
    weights (the same on every rank), which move to this rank's device. Attention modules get their
    local head counts, so the model's forward and `hidden` run unchanged on every rank.
    """
    if mesh.ndim != 1:
        raise ModelError(f"mesh: expected a 1-D device mesh, got {mesh.ndim} dimensions")
    if model in _MESHES:
        raise ModelError("model: already tensor-parallel")
    config, tp = model.config, mesh.size()
    check_tp_size(config, tp)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for i, block in enumerate(model.layers):
        for path in BLOCK_PLAN:
            module = block.get_submodule(path)
            if type(module) is not nn.Linear:  # LoRA-wrapped or quantized: its weights are not a Linear's
                raise ModelError(
                    f"layers.{i}.{path}: expected nn.Linear, got {type(module).__name__} "
                    "(merge LoRA / use an unquantized model before sharding)"
                )
        attn = block.self_attn
        assert isinstance(attn, Attention)
        attn.qkv = None  # a fused q/k/v buffer (generate's graph modes) no longer views the shards
        parallelize_module(block, mesh, {path: styles[style]() for path, style in BLOCK_PLAN.items()})
        attn.n_heads, attn.n_kv_heads = config.n_heads // tp, config.n_kv_heads // tp
    if not config.tie_embeddings:
        parallelize_module(model.lm_head, mesh, ColwiseParallel(output_layouts=Replicate()))
    if not _is_meta(model):
        model.to(mesh_device(mesh))  # replicated weights; shards are already there
    _retie(model)
    _MESHES[model] = mesh
    return model


def build_parallel(
    config: ModelConfig | str,
    mesh: DeviceMesh,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Transformer:
    """A randomly initialised (registry init) model, sharded: each rank allocates only its shards.

    Sharded weights are drawn with DTensor's random ops; replicated weights with the seeded
    default generator, identical on every rank.
    """
    if isinstance(config, str):
        config = ModelConfig.from_name(config)
    check_tp_size(config, mesh.size())
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)
    tensor_parallel(model, mesh)
    model.to_empty(device=mesh_device(mesh))
    _retie(model)  # to_empty gives each module its own new Parameter
    torch.manual_seed(seed)
    with torch.no_grad():
        model.reset_parameters()
    return model.eval()


def load_parallel(
    directory: str,
    mesh: DeviceMesh,
    *,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """A model directory, sharded: each rank allocates its shards and reads only those (by slice)
    from the weight files, plus the replicated tensors. dtype: default, the stored one."""
    config = read_config(directory)
    check_tp_size(config, mesh.size())
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype or stored_dtype(directory))
    tensor_parallel(model, mesh)
    model.to_empty(device=mesh_device(mesh))
    _retie(model)  # to_empty gives each module its own new Parameter
    return load_weights(model, directory).eval()


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights this rank holds (its shards plus the replicated tensors, ties once)."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() yields a tied weight once
        t = p.to_local() if isinstance(p, DTensor) else p
        if id(p) not in seen:
            seen.add(id(p))
            total += t.numel() * t.element_size()
    return total


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _retie(model: Transformer) -> None:
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def is_tensor_parallel(model: Transformer) -> bool:
    """Was `model` sharded by tensor_parallel (so ds_models.generate hands it to generate_parallel)?"""
    return model in _MESHES


def mesh_of(model: Transformer) -> DeviceMesh:
    """The mesh `model` was sharded over by tensor_parallel."""
    mesh = _MESHES.get(model)
    if mesh is None:
        raise ModelError("model: not tensor-parallel (call ds_models.parallel.tensor_parallel first)")
    return mesh


# ---- decoding ------------------------------------------------------------------------------------


class ParallelDecoder:
    """Prefill and one-token steps of a tensor-parallel model over a KV cache of its local kv heads.

    Every rank runs the same calls with the same tokens; the all-reduced / all-gathered logits are
    identical on every rank, so each rank samples the same next token without exchanging it.
    mode "cuda-graph" records the step (collectives included) once, at the first `step`, and
    replays it; "auto" picks it on CUDA and "eager" elsewhere.
    """

    def __init__(self, model: Transformer, batch_size: int, max_len: int, *, mode: str = "auto") -> None:
        mesh = mesh_of(model)
        if mode not in MODES:
            raise ModelError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.device = mesh_device(mesh)
        if mode == "auto":
            mode = "cuda-graph" if self.device.type == "cuda" else "eager"
        if mode == "cuda-graph" and self.device.type != "cuda":
            raise ModelError(f"mode: cuda-graph needs a CUDA mesh, this one is on {self.device}")
        self.model, self.mode = model, mode
        dtype = model.norm.weight.dtype
        self.cache = KVCache(
            local_config(model.config, mesh.size()), batch_size, max_len, device=self.device, dtype=dtype
        )
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) from slot 0 (attention_mask marks left padding) -> last logits (B, vocab) fp32."""
        h = self.model.hidden(ids, cache=self.cache, attention_mask=attention_mask)  # (B, T, d_model)
        return self.model.lm_head(h[:, -1]).float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) at cache slot input_pos (1,) -> logits (B, vocab) fp32 (graph: a fixed buffer)."""
        if self.mode == "eager":
            return self._step(tokens, input_pos)
        graph = self.graph or self._capture(tokens, input_pos)
        self.tokens.copy_(tokens)
        self.pos.copy_(input_pos)
        graph.replay()
        return self.logits

    def _step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        h = self.model.hidden(tokens, input_pos=input_pos, cache=self.cache)  # (B, 1, d_model)
        return self.model.lm_head(h[:, -1]).float()

    def _capture(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream (as torch.cuda.graphs requires) lets cuBLAS and NCCL set up their
        # workspaces; it writes cache slot input_pos, which the first real step overwrites.
        self.tokens, self.pos = tokens.clone(), input_pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step(self.tokens, self.pos)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread must avoid unsafe CUDA calls while capturing; c10d's
        # watchdog and NCCL's proxy threads keep running (torch.compile's CUDA graphs do the same).
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = self._step(self.tokens, self.pos)
        return self.graph


def generate_parallel(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    *,
    mode: str = "auto",
) -> list[list[int]]:
    """ds_models.generate for a tensor-parallel model; call it on every rank with the same arguments.

    Returns every row's new tokens (a row ends after its first stop token, kept), the same on all ranks.
    """
    mesh = mesh_of(model)
    rows = check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p)
    device = mesh_device(mesh)
    ids, mask, padded = left_pad(rows, device)  # (B, T) each
    B, T = ids.shape

    generator = None
    if temperature > 0:
        if seed is None:  # ranks must draw the same tokens: rank 0 picks the seed for all
            shared = torch.randint(0, 2**62, (1,), device=device)
            dist.broadcast(shared, group=mesh.get_group(), group_src=0)
            seed = int(shared)
        generator = torch.Generator(device=device).manual_seed(seed)

    decoder = ParallelDecoder(model, B, T + max_new_tokens, mode=mode)
    logits = decoder.prefill(ids, mask if padded else None)  # (B, vocab)
    tok = sample(logits, temperature, top_k, top_p, generator)
    tokens = [tok]
    input_pos = torch.tensor([T], dtype=torch.long, device=device)
    for _ in range(max_new_tokens - 1):
        logits = decoder.step(tok[:, None], input_pos)
        tok = sample(logits, temperature, top_k, top_p, generator)
        tokens.append(tok)
        input_pos += 1
    out = torch.stack(tokens, dim=1).tolist()  # (B, N)
    stops = set(stop_tokens or ())
    for row in out:
        for j, t in enumerate(row):
            if t in stops:
                del row[j + 1 :]
                break
    return out
