"""Generation: prefill once into a preallocated KV cache, then one token per step.

Prompts of different lengths are left-padded into one batch; the cache remembers each row's
padding, so every row sees its own RoPE positions and never attends to padding (see KVCache).

On CUDA the one-token decode step runs without per-token Python overhead (gpt-fast style: a
static cache, shapes that never change between steps):
  "compile"     the default on CUDA. Dense models: torch.compile(mode="reduce-overhead",
                fullgraph=True), fused kernels captured in a CUDA graph (batch 1 of a narrow model:
                inductor's tuned matrix-vector reductions, GEMV_COMPILE_OPTIONS, and ds_core's
                Triton GEMV for q/k/v and down, STEP_KERNELS). Sparse models: ds_core's
                sparse MLP picks its kernels on the host (cached per weight version), which dynamo
                cannot trace; the step is compiled with graph breaks there, and the whole of it is
                captured once with torch.cuda.CUDAGraph and replayed.
  "cuda-graph"  the eager step captured with torch.cuda.CUDAGraph and replayed (no compiler).
  "eager"       plain PyTorch; the default on CPU.
Every one-token step of a dense model attends through ds_core.dense_decode_attention: only the
valid cache slots are read, their range a device tensor (no mask is built per step).
Sampling runs outside the graph with an explicitly seeded torch.Generator, so a seed gives the
same tokens in every mode.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ds_models.config import ModelError
from ds_models.model import KVCache, Transformer

CACHE_ROUND = 256  # cache lengths are rounded up so nearby requests reuse one compiled graph


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    stream: bool = False,
    *,
    mode: str = "auto",
) -> list[list[int]] | Iterator[list[int | None]]:
    """Continue each prompt by up to max_new_tokens tokens.

    Returns the new tokens of every row (a row ends after its first stop token, which is kept).
    With stream=True returns an iterator instead that yields, per step, one token per row
    (None for rows that have already stopped). temperature 0 is greedy; otherwise logits are divided
    by temperature, cut to top_k and to the top_p probability mass, and sampled. `mode` picks how the
    decode step runs (module docstring); "auto" honours the environment variable DS_MODELS_DECODE.
    """
    parallel = sys.modules.get("ds_models.parallel")  # a sharded model was made by that module
    if parallel is not None and parallel.is_tensor_parallel(model):
        if stream:
            raise ModelError("stream: not supported for a tensor-parallel model (ds_models.parallel)")
        return parallel.generate_parallel(
            model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, mode=mode
        )
    rows = check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p)
    device = model.embed_tokens.weight.device
    mode = _resolve_mode(model, mode, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=device)
    steps = _steps(model, rows, max_new_tokens, temperature, top_k, top_p, generator, mode)
    if stream:
        return _stream(steps, stops, len(rows))
    return _collect(steps, stops, len(rows))


MODES = ("auto", "eager", "cuda-graph", "compile")


def _resolve_mode(model: Transformer, mode: str, device: torch.device) -> str:
    if mode == "auto":
        mode = os.environ.get("DS_MODELS_DECODE", "auto")
    if mode not in MODES:
        raise ModelError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        if device.type != "cuda":
            return "eager"
        return "compile"
    if mode == "cuda-graph" and device.type != "cuda":
        raise ModelError(f"mode: cuda-graph needs the model on a CUDA device, it is on {device}")
    return mode


def check_arguments(
    model: Transformer, prompts, max_new_tokens, temperature, top_k, top_p
) -> list[list[int]]:
    """generate's arguments checked (errors name the argument); the prompts as lists of ints."""
    rows = _check_prompts(model, prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ModelError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ModelError(f"temperature: expected >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ModelError(f"top_k: expected a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ModelError(f"top_p: expected a number in (0, 1], got {top_p}")
    return rows


def left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Prompts as (B, T) ids left-padded with token 0, their (B, T) mask (1 = token), and whether
    any row is padded."""
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, T - len(row) :] = torch.tensor(row)
        mask[b, T - len(row) :] = 1
    return ids.to(device), mask.to(device), any(len(r) < T for r in rows)


def _check_prompts(model: Transformer, prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ModelError(f"prompts: expected a (B, T) tensor, got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ModelError("prompts: expected at least one prompt")
    vocab = model.config.vocab_size
    for i, row in enumerate(rows):
        if not row:
            raise ModelError(f"prompts[{i}]: empty; every prompt needs at least one token")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise ModelError(f"prompts[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab})")
    return rows


def _collect(steps: Iterator[torch.Tensor], stops: torch.Tensor, batch: int) -> list[list[int]]:
    # Tokens stay on the device until the end: no host sync per step, so the CPU queues graph
    # replays ahead of the GPU. With stop tokens, check for "all rows done" every 32 steps.
    tokens, done = [], torch.zeros(batch, dtype=torch.bool, device=stops.device)
    for i, tok in enumerate(steps):
        tokens.append(tok)
        if stops.numel():
            done |= torch.isin(tok, stops)
            if i % 32 == 31 and bool(done.all()):
                break
    out = torch.stack(tokens, dim=1).tolist()  # (B, N)
    if stops.numel():
        stop_set = set(stops.tolist())
        for row in out:
            for j, t in enumerate(row):
                if t in stop_set:
                    del row[j + 1 :]
                    break
    return out


def _stream(steps: Iterator[torch.Tensor], stops: torch.Tensor, batch: int) -> Iterator[list[int | None]]:
    stop_set = set(stops.tolist())
    done = [False] * batch
    for tok in steps:
        row_tokens: list[int | None] = []
        for b, t in enumerate(tok.tolist()):
            row_tokens.append(None if done[b] else t)
            done[b] = done[b] or t in stop_set
        yield row_tokens
        if all(done):
            return


# ---- the engine ----------------------------------------------------------------------------------


# Per model, the cache (and captured graph) of the last compiled / captured call. Reusing them keeps
# the buffer addresses that a CUDA graph was recorded with: a fresh cache per call would make
# torch.compile's graphs re-record (or a capture be redone) on every call.
_reusable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_state(model: Transformer, batch: int, cache_len: int, mode: str, kernels: frozenset) -> dict:
    weights = model.embed_tokens.weight
    new = {"cache": None, "graph": None, "busy": False, "key": None}
    if mode != "eager":
        # Weights replaced (model.to(...)) or updated in place (training) invalidate a recorded graph.
        params = tuple((p.data_ptr(), p._version) for p in model.parameters())
        key = (batch, cache_len, weights.dtype, weights.device, kernels, params)
        state = _reusable.get(model)
        if state is not None and state["key"] == key and not state["busy"]:
            state["cache"].pad.zero_()
            state["cache"].has_padding = state["cache"].fixed_shapes = False
            return state
        new["key"] = key
        if state is None or not state["busy"]:  # a live stream keeps its own state
            _reusable[model] = new
    new["cache"] = KVCache(model.config, batch, cache_len, device=weights.device, dtype=weights.dtype)
    return new


def _steps(model, rows, max_new_tokens, temperature, top_k, top_p, generator, mode) -> Iterator[torch.Tensor]:
    """Yield the sampled tokens (B,) of every step, on the model's device."""
    device = model.embed_tokens.weight.device
    ids, mask, padded = left_pad(rows, device)  # (B, T) each, token 0 at masked-out padding
    B, T = ids.shape
    cache_len = -(-(T + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND

    if mode != "eager":
        for layer in model.layers:
            layer.self_attn.fuse_qkv()  # no-op when already fused and intact
    kernels = _step_kernels(model, B, mode)
    state = _decode_state(model, B, cache_len, mode, kernels)
    cache = state["cache"]
    cache.kernels = kernels
    state["busy"] = True
    try:
        logits = _prefill(model, cache, ids, mask if padded else None)  # (B, vocab)
        tok = sample(logits, temperature, top_k, top_p, generator)
        yield tok
        if max_new_tokens == 1:
            return
        input_pos = torch.tensor([T], dtype=torch.long, device=device)
        cache.fixed_shapes = mode != "eager"
        if mode == "eager":
            step = _decode_step
        elif mode == "compile" and not _is_sparse(model):
            step = _compiled_decode_step
        else:
            if state["graph"] is None:
                state["graph"] = _capture(model, cache, tok[:, None], input_pos, mode)
            step = state["graph"]
        for _ in range(max_new_tokens - 1):
            if step is _compiled_decode_step:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
            with torch.no_grad():
                logits = step(model, cache, tok[:, None], input_pos)
                tok = sample(logits, temperature, top_k, top_p, generator)
                input_pos += 1
            yield tok
    finally:
        state["busy"] = False


@torch.no_grad()
def _prefill(
    model: Transformer, cache: KVCache, ids: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    # Prompt lengths vary from call to call, so the prefill runs eagerly; only the last position's
    # logits are computed (lm_head over the whole prompt would be T x vocab for nothing).
    h = model.hidden(ids, cache=cache, attention_mask=mask)  # (B, T, d_model)
    return model.lm_head(h[:, -1]).float()


def _decode_step(
    model: Transformer, cache: KVCache, tokens: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """tokens (B, 1) at cache slot input_pos (1,) -> logits (B, vocab) float32."""
    h = model.hidden(tokens, input_pos=input_pos, cache=cache)  # (B, 1, d_model)
    return model.lm_head(h[:, -1]).float()


def _is_sparse(model: Transformer) -> bool:
    return model.config.sparse_ratio > 0 or model.config.attention_sparse_ratio > 0


_compiled: dict[str, object] = {}

# Inductor settings of the dense decode step (torch.compile options; "triton.cudagraphs" is what
# mode="reduce-overhead" sets). At batch 1 the step is a chain of matrix-vector products, each
# reading its weight once. cuBLAS's GEMVs reach ~2.7 TB/s on ds-7b's matrices but only 0.9-2.1 TB/s
# on ds-1.5b's (d_model 1536), where launch latency dominates the small q/k/v/o reads. There,
# coordinate_descent_tuning pays: inductor rewrites an mm of one row into a multiply-and-sum
# reduction (its decomposition of aten.mm), tunes each such kernel's block sizes, and fuses
# neighbouring work into it (gate with up, SiLU * up into down, RMSNorm, the logits' float cast).
# Measured on an H100 (docs/benchmarks/ds-models.md, ds-1.5b): 2.25 -> 2.07-2.21 ms per step; the
# compile takes ~70 s instead of ~40 s (~30 s from inductor's on-disk cache). Wider models and
# larger batches keep the plain setting, which is what was measured for them.
DENSE_COMPILE_OPTIONS: dict[str, object] = {"triton.cudagraphs": True}
# Projections of the batch-1 step of a narrow dense model (compile / cuda-graph modes) that run as
# ds_core's Triton GEMV (kernels/triton_gemv.py) instead of cuBLAS / inductor's reduction: "qkv"
# with its bias in the epilogue, "down" with silu(gate) * up formed in its prologue. On an H100
# (docs/benchmarks/ds-models.md) these two beat both; o, gate and lm_head did not, per kernel. The
# environment variable DS_MODELS_STEP_KERNELS (a comma list of them, or "none") overrides it.
STEP_KERNELS = ("qkv", "down")
GEMV_COMPILE_OPTIONS: dict[str, object] = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
GEMV_MAX_D_MODEL = 2048


def _step_kernels(model: Transformer, batch: int, mode: str) -> frozenset[str]:
    """The projections that run as ds_core's GEMV in this call's decode step (STEP_KERNELS)."""
    weights = model.embed_tokens.weight
    if mode == "eager" or batch != 1 or not weights.is_cuda or model.config.d_model > GEMV_MAX_D_MODEL:
        return frozenset()
    if _is_sparse(model) or not all(type(m) is nn.Linear for m in _gemv_linears(model)):
        return frozenset()  # sparse MLPs, LoRA-wrapped or quantized projections keep their own kernels
    env = os.environ.get("DS_MODELS_STEP_KERNELS")
    kinds = STEP_KERNELS if env is None else [k for k in env.replace(" ", "").split(",") if k and k != "none"]
    bad = [k for k in kinds if k not in ("qkv", "down")]
    if bad:
        raise ModelError(f"DS_MODELS_STEP_KERNELS: unknown kernel {bad[0]!r}, expected some of qkv, down")
    if kinds:
        from ds_core.kernels import triton_gemv  # noqa: F401  registers torch.ops.ds_core.gemv

    return frozenset(kinds)


def _gemv_linears(model: Transformer) -> Iterator[nn.Module]:
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        yield from (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj, m.down_proj)


def _compiled_decode_step(model, cache, tokens, input_pos):
    """Dense models: one graph, compiled and captured by torch.compile's CUDA graph trees."""
    gemv = tokens.shape[0] == 1 and model.config.d_model <= GEMV_MAX_D_MODEL
    key = "dense-gemv" if gemv else "dense"
    if key not in _compiled:
        options = GEMV_COMPILE_OPTIONS if gemv else DENSE_COMPILE_OPTIONS
        _compiled[key] = torch.compile(_decode_step, options=dict(options), fullgraph=True, dynamic=False)
    return _compiled[key](model, cache, tokens, input_pos)


def _compiled_for_capture(model, cache, tokens, input_pos):
    """Sparse models: inductor fuses what dynamo can trace; ds_core's sparse MLP, whose kernel choice
    happens on the host, becomes graph breaks. _CapturedStep then records the whole step, graph
    breaks included, into one CUDA graph, so the breaks cost nothing per token."""
    if "default" not in _compiled:
        _compiled["default"] = torch.compile(_decode_step, dynamic=False)
    return _compiled["default"](model, cache, tokens, input_pos)


def _capture(model, cache, tokens, input_pos, mode) -> _CapturedStep:
    if mode == "compile":
        try:
            return _CapturedStep(model, cache, tokens, input_pos, _compiled_for_capture)
        except Exception as e:  # a compiler failure must not cost the user the generation
            warnings.warn(f"ds-models: compiling the sparse decode step failed ({e!r:.200}); "
                          "capturing the eager step instead", RuntimeWarning, stacklevel=3)  # fmt: skip
    return _CapturedStep(model, cache, tokens, input_pos, _decode_step)


class _CapturedStep:
    """The eager decode step recorded once into a CUDA graph, replayed for every token.

    The graph reads its inputs from, and writes logits to, fixed buffers; the KV cache is written
    in place at the slot held in `self.pos`. Warm-up runs happen on a side stream before capture
    (as torch.cuda.graphs requires) and write only slots the real steps overwrite later.
    """

    def __init__(self, model, cache, tokens, input_pos, fn=None) -> None:
        fn = fn or _decode_step
        self.tokens, self.pos = tokens.clone(), input_pos.clone()
        # Graph breaks resume in per-layer frames that dynamo specialises on the layer index: allow a
        # compile per layer (only here, where everything compiles once before capture).
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch._dynamo.config.patch({limit: 4 * len(model.layers) + 8}), torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(3):  # compiles; lets ds_core / cuBLAS pick and cache kernels, workspaces
                    fn(model, cache, self.tokens, self.pos)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = fn(model, cache, self.tokens, self.pos)

    def __call__(self, model, cache, tokens, input_pos) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.copy_(input_pos)
        self.graph.replay()
        return self.logits


def sample(
    logits: torch.Tensor,  # (B, vocab) float
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row (B,): greedy at temperature 0, else temperature / top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
