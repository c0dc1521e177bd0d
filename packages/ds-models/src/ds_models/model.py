"""The ds decoder, top to bottom: RMSNorm, RoPE, GQA attention, SwiGLU MLP, block, Transformer.

Module names mirror Hugging Face Llama / Qwen2 minus the "model." prefix, so checkpoints of
those architectures map by name (hf_import.py), LoRA targets read the same, and ds-quant swaps
`nn.Linear`s by name. The MLP is ds_core's SparseMLP (dense SwiGLU at sparse_ratio 0); attention
calls ds_core's sparse_attention when attention_sparse_ratio > 0.

Shapes: B batch, T new tokens, S key slots (cache length), H query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_core import (
    DynamicSparseLinear,
    SparseMLP,
    SparsityConfig,
    dense_decode_attention,
    sparse_attention,
    sparse_linear,
)
from ds_core.sparse_attention import pool_keys
from ds_models.config import ModelConfig, ModelError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (bf16 squares lose too much), scale in the input dtype, as HF does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# ---- rotary position embedding -----------------------------------------------------------------
# The "rotate half" layout of HF Llama/Qwen2 (not interleaved pairs), so imported q/k weights need
# no permutation. Angles are computed from positions on the fly: no max-length table to allocate,
# and every row of a batch may sit at a different position (left-padded prompts).


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, D) in `dtype`."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


# ---- KV cache ----------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys/values for every layer: (B, K, S, D) each, written in place.

    Rows may be left-padded: `pad[b]` slots at the start of row b hold no token, so a token in slot
    s of row b sits at RoPE position s - pad[b] and attends to slots pad[b]..s only. The buffers
    never move, which lets a captured CUDA graph (generate.py) read and write them directly.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.has_padding = False  # host-side flag: no device sync needed to pick the attention path
        # Set by generate for its captured / compiled decode steps, which need the same shapes every
        # step (they also use fused q/k/v weights). Sparse attention keeps working there: one-token
        # steps give ds_core the whole cache and the valid length as a device tensor.
        self.fixed_shapes = False
        # Projections of a batch-1 one-token step that run as ds_core's Triton GEMV ("qkv", "down";
        # generate sets them for its compiled / captured steps of narrow dense models).
        self.kernels: frozenset[str] = frozenset()
        # Sparse attention: the mean key of every block of each row (counted from the row's first
        # token, after its padding), so a decode step scores blocks without reading all of K.
        # Prefills fill it (pool_written); each decode step's sparse_attention call refreshes the
        # block its new key completes.
        self.block_size = SparsityConfig().attention_block_size
        self.pooled: list[torch.Tensor] | None = None
        if config.attention_sparse_ratio > 0:
            pooled = (batch_size, config.n_kv_heads, -(-max_len // self.block_size), config.head_dim)
            self.pooled = [torch.zeros(pooled, device=device, dtype=dtype) for _ in range(config.n_layers)]
        if self.pad.is_cuda:
            # Tell torch.compile's CUDA graphs these inputs keep their address (no copy per step).
            for t in [*self.k, *self.v, self.pad, *(self.pooled or [])]:
                torch._dynamo.mark_static_address(t)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """attention_mask (B, T): 1 for tokens, 0 for left padding, as given with the prefill."""
        valid = attention_mask.to(torch.long)
        if bool((valid[:, 1:] < valid[:, :-1]).any()):
            raise ModelError("attention_mask: padding must be on the left (0s before 1s in every row)")
        self.pad.copy_((valid == 0).sum(dim=1))
        self.has_padding = bool(self.pad.any())

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, D) into slots input_pos (T,); return the whole buffers (B, K, S, D)."""
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]

    def pool_written(self, first: int, length: int) -> None:
        """Refresh the pooled keys of every block holding slots first..length-1 (after a prefill).

        Row b's blocks start at its first token (slot pad[b]), as ds_core's device-length decode
        expects. Host ints: prefills run eagerly.
        """
        if self.pooled is None:
            return
        if not self.has_padding:
            for k, pooled in zip(self.k, self.pooled):
                pool_keys(k[:, :, :length], self.block_size, out=pooled, start=first)
            return
        for b, pad in enumerate(self.pad.tolist()):
            if length <= pad:
                continue
            for k, pooled in zip(self.k, self.pooled):
                pool_keys(
                    k[b : b + 1, :, pad:length],
                    self.block_size,
                    out=pooled[b : b + 1],
                    start=max(0, first - pad),
                )


# ---- attention ---------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, hd = config.d_model, config.head_dim
        # sparse_projections "all": q/k/v/o skip their small input activations too (TEAL), as
        # ds_core DynamicSparseLinear (an nn.Linear: same parameters and state-dict keys).
        proj = (
            SparsityConfig(sparse_ratio=config.sparse_ratio, mode=config.sparsity_mode)
            if config.sparse_ratio > 0 and config.sparse_projections == "all"
            else None
        )
        self.q_proj = _linear(d, config.n_heads * hd, config.qkv_bias, proj)
        self.k_proj = _linear(d, config.n_kv_heads * hd, config.qkv_bias, proj)
        self.v_proj = _linear(d, config.n_kv_heads * hd, config.qkv_bias, proj)
        self.o_proj = _linear(config.n_heads * hd, d, False, proj)
        self.sparsity = (
            SparsityConfig(attention_sparse_ratio=config.attention_sparse_ratio, mode=config.sparsity_mode)
            if config.attention_sparse_ratio > 0
            else None
        )
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see fuse_qkv
        self._sparse_qkv_t: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def fuse_qkv(self) -> None:
        """Lay the q/k/v weights out in one buffer, the three Linears keeping views into it.

        A decode step then reads them with one matmul instead of three (k/v are small: a third of
        their time would be launch latency). Values, module names and state-dict keys are unchanged;
        only generate's captured/compiled steps (cache.fixed_shapes) use the fused buffer, after
        `qkv_intact` confirmed that the Linears still view it. Idempotent.
        """
        if self.qkv_intact():
            return
        lins = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv = None
        if any(type(m) is not nn.Linear for m in lins):  # LoRA-wrapped or quantized: leave alone
            return
        with torch.no_grad():
            w = torch.cat([m.weight for m in lins])  # ((H + 2K) * D, d_model)
            b = torch.cat([m.bias for m in lins]) if self.q_proj.bias is not None else None
        rows = [m.out_features for m in lins]
        for m, wv, bv in zip(lins, w.split(rows), b.split(rows) if b is not None else [None] * 3):
            m.weight = nn.Parameter(wv, requires_grad=m.weight.requires_grad)
            if bv is not None:
                m.bias = nn.Parameter(bv, requires_grad=m.bias.requires_grad)
        if w.is_cuda:
            torch._dynamo.mark_static_address(w)  # a CUDA graph input that never moves
            if b is not None:
                torch._dynamo.mark_static_address(b)
        self.qkv = (w, b)

    def qkv_intact(self) -> bool:
        """Do the Linears still view the fused buffer (no .to(), module swap or reassignment since)?"""
        if self.qkv is None:
            return False
        w, b = self.qkv
        offset = 0
        for m in (self.q_proj, self.k_proj, self.v_proj):
            if type(m) is not nn.Linear or m.weight.dtype != w.dtype or m.weight.device != w.device:
                return False
            if m.weight.data_ptr() != w.data_ptr() + offset * w.shape[1] * w.element_size():
                return False
            if (b is None) != (m.bias is None) or (
                b is not None and m.bias.data_ptr() != b.data_ptr() + offset * b.element_size()
            ):
                return False
            offset += m.out_features
        return True

    # A graph break under torch.compile (free inside the captured step), as ds_core's own sparse
    # layers: the threshold check reads a host-side cache and the kernels launch from Python.
    @torch.compiler.disable
    def _sparse_qkv(self, x: torch.Tensor) -> torch.Tensor | None:
        """q/k/v of calibrated dynamic-sparse projections as ONE row-gather product, or None.

        The three share their input and, calibrated together, their threshold, so one compaction
        of x and one GEMV over the concatenated transposed weights (cached, a second copy of them
        while the model serves) do what three modules would do with three of each. Used for
        inference with a KV cache; training and cache-free forwards run the three modules.
        """
        lins = (self.q_proj, self.k_proj, self.v_proj)
        if torch.is_grad_enabled() or any(
            type(m) is not DynamicSparseLinear or m.sparsity.mode != "dynamic" or not m.calibrated
            for m in lins
        ):
            return None
        if len({m._host_thresholds() for m in lins}) != 1:  # calibrated apart: keep them apart
            return None
        key = tuple(
            (t.data_ptr(), t._version, t.dtype, t.device)
            for m in lins
            for t in (m.weight, m.bias)
            if t is not None
        )
        if self._sparse_qkv_t is None or self._sparse_qkv_t[0] != key:
            with torch.no_grad():
                wt = torch.cat([m.weight for m in lins]).t().contiguous()  # (d_model, (H + 2K) * D)
                b = torch.cat([m.bias for m in lins]) if self.q_proj.bias is not None else None
            self._sparse_qkv_t = (key, (wt, b))
        wt, b = self._sparse_qkv_t[1]
        s = self.q_proj.sparsity
        return sparse_linear(
            x,
            wt,
            self.q_proj.act_threshold,
            b,
            ratio=s.sparse_ratio,
            dense_fallback_union=s.dense_fallback_union,
        )

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d_model)
        cos: torch.Tensor,  # (B, 1, T, D)
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # (B, 1, G*T, S) additive bias (0 / -inf); None = plain causal
        input_pos: torch.Tensor | None,  # (T,) cache slots, with a cache
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        sizes = [
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        ]
        if self.qkv is not None and cache is not None and cache.fixed_shapes:
            # Batch-1 steps of generate: one ds_core GEMV with the bias in its epilogue (cuBLAS's
            # addmm is a GEMV plus an add there, and inductor leaves it alone).
            kernels = cache.kernels if isinstance(cache, _DecodeView) else ()
            qkv = torch.ops.ds_core.gemv(x, *self.qkv) if "qkv" in kernels else F.linear(x, *self.qkv)
            q, k, v = qkv.split(sizes, dim=-1)
        elif cache is not None and (qkv := self._sparse_qkv(x)) is not None:
            q, k, v = qkv.split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            assert input_pos is not None
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, K, S, D)

        if self.sparsity is not None and isinstance(cache, _DecodeView):
            # One-token step over the whole cache, valid slots pad[b] .. input_pos on the device:
            # the same call in eager, captured and compiled decode (no host sync, fixed shapes).
            y = _sparse_decode(
                q,
                k,
                v,
                sparsity=self.sparsity,
                kv_length=cache.length,
                kv_start=cache.pad,
                pooled_k=cache.pooled[self.layer_idx],
            )
        elif isinstance(cache, _DecodeView):
            # Dense one-token step: ds_core's decode kernel reads only slots pad[b] .. input_pos
            # (length on the device; no mask to build, traceable and capturable).
            y = dense_decode_attention(q, k, v, kv_length=cache.length, kv_start=cache.pad)
        elif self.sparsity is not None and mask is None:
            # Unpadded prefill: ds_core picks sinks + local window + top key blocks per GQA group.
            y = sparse_attention(q, k, v, sparsity=self.sparsity, causal=True)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = _masked_gqa_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


def _linear(n_in: int, n_out: int, bias: bool, sparsity: SparsityConfig | None) -> nn.Linear:
    if sparsity is None:
        return nn.Linear(n_in, n_out, bias=bias)
    return DynamicSparseLinear(n_in, n_out, bias=bias, sparsity=sparsity)


# ds_core validates its inputs in Python and launches Triton kernels that update the pooled-key
# cache in place: under torch.compile the call is a graph break (free inside the captured graph).
_sparse_decode = torch.compiler.disable(sparse_attention)


def _masked_gqa_attention(q, k, v, bias):
    """SDPA with an explicit mask, GQA without copying the cache.

    The G = H/K query heads that share a kv head are folded into the query-length axis,
    (B, H, T, D) -> (B, K, G*T, D), so every SDPA backend (including the memory-efficient one that
    takes a mask) sees plain multi-head attention over the unrepeated (B, K, S, D) keys. The bias
    comes already folded (attention_bias), built once per forward rather than once per layer.
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    q = q.reshape(B, K, H // K * T, D)  # heads are kv-head-major: head h uses kv head h // G, as in HF
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, K, G*T, D)
    return y.reshape(B, H, T, D)


def attention_bias(allowed: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """allowed (B, 1, T, S) bool -> additive bias (B, 1, G*T, S): 0 where allowed, -inf elsewhere."""
    allowed = allowed.repeat(1, 1, group, 1)  # row g*T + t is query t of the g-th head in a group
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


# ---- decoder block and model -------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        sparsity = (
            SparsityConfig(sparse_ratio=config.sparse_ratio, mode=config.sparsity_mode)
            if config.sparse_ratio > 0
            else None
        )
        self.mlp = SparseMLP(config.d_model, config.d_ff, sparsity=sparsity)

    def forward(self, x, cos, sin, mask, input_pos, cache):  # x (B, T, d_model)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, cache)
        h = self.post_attention_layernorm(x)
        if "down" in (cache.kernels if isinstance(cache, _DecodeView) else ()):
            # Batch-1 step of generate, dense MLP: the down projection as ds_core's GEMV, which
            # forms silu(gate) * up in its prologue.
            m = self.mlp
            return x + torch.ops.ds_core.gemv(
                m.gate_proj(h), m.down_proj.weight, m.down_proj.bias, m.up_proj(h)
            )
        return x + self.mlp(h)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 style: N(0, 0.02), residual outputs scaled down by depth so the stream stays O(1).
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "layernorm" in name or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / (2 * self.config.n_layers) ** 0.5)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=std)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.gradient_checkpointing = enabled

    def hidden(
        self,
        input_ids: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model); `forward` applies lm_head to them."""
        B, T = input_ids.shape
        device = input_ids.device
        mask = None
        pool_after = None
        if cache is None:
            if input_pos is not None:
                raise ModelError("input_pos: only meaningful with a cache")
            if attention_mask is None:
                positions = torch.arange(T, device=device).expand(B, T)  # (B, T)
            else:
                valid = attention_mask.to(device=device, dtype=torch.bool)  # (B, T)
                positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
                slots = torch.arange(T, device=device)
                causal = slots[None, :] <= slots[:, None]  # (T, T)
                # Padded queries see themselves only, so no softmax row is empty (no NaN).
                mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
                mask = mask[:, None]  # (B, 1, T, T)
        else:
            if input_pos is None:
                input_pos = torch.arange(T, device=device)  # a prefill from slot 0
            if attention_mask is not None:
                cache.set_padding(attention_mask)
            positions = input_pos[None, :] - cache.pad[:, None]  # (B, T)
            sparse = self.config.attention_sparse_ratio > 0
            if T == 1:
                # Decode: ds_core reads the valid length (and each row's padding) on the device.
                cache = _DecodeView(cache, input_pos + 1)
            else:
                slots = torch.arange(cache.max_len, device=device)  # (S,)
                mask = slots[None, None, :] <= input_pos[None, :, None]  # (1, T, S) causal over slots
                mask = mask & (slots[None, None, :] >= cache.pad[:, None, None])  # (B, T, S) skip padding
                mask = (mask | (slots[None, None, :] == input_pos[None, :, None]))[:, None]  # (B, 1, T, S)
            if sparse and T > 1 and not cache.fixed_shapes:
                first, length = int(input_pos[0]), int(input_pos[-1]) + 1
                pool_after = cache  # the pooled keys of the prefilled blocks, for later decode steps
                if not cache.has_padding:
                    # ds_core.sparse_attention takes the valid prefix of the cache and no mask.
                    mask = None
                    cache = _PrefixView(cache, length)

        x = self.embed_tokens(input_ids)  # (B, T, d_model)
        if mask is not None:
            mask = attention_bias(mask, self.config.n_heads // self.config.n_kv_heads, x.dtype)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, input_pos, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos, cache)
        if pool_after is not None:
            pool_after.pool_written(first, length)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        *,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32. No loss here: callers compute it from the logits.

        Without a cache, attends causally over input_ids; attention_mask (B, T) marks left padding
        with 0. With a cache, input_pos (T,) gives the cache slots the T tokens go to (default
        0..T-1, a prefill); an attention_mask given with the prefill fixes each row's padding.
        """
        h = self.hidden(input_ids, input_pos=input_pos, cache=cache, attention_mask=attention_mask)
        return self.lm_head(h).float()

    # ---- checkpoints (checkpoint.py holds the format) ----

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        provenance: dict | None = None,
        tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    ) -> None:
        from ds_models.checkpoint import save_pretrained

        save_pretrained(self, directory, provenance=provenance, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Transformer:
        from ds_models.checkpoint import load_pretrained

        return load_pretrained(name_or_dir, device=device, dtype=dtype)


class _DecodeView:
    """A KVCache during a one-token step: `length` (1,) = input_pos + 1, the valid slots' end."""

    def __init__(self, cache: KVCache, length: torch.Tensor) -> None:
        self.cache, self.length = cache, length
        self.pad, self.pooled, self.fixed_shapes = cache.pad, cache.pooled, cache.fixed_shapes
        self.kernels = cache.kernels if cache.batch_size == 1 else frozenset()

    def update(self, layer, input_pos, k, v):
        return self.cache.update(layer, input_pos, k, v)


class _PrefixView:
    """The first `length` slots of a KVCache, for ds_core.sparse_attention (no mask argument)."""

    fixed_shapes = False

    def __init__(self, cache: KVCache, length: int) -> None:
        self.cache, self.length = cache, length

    def update(self, layer, input_pos, k, v):
        k_all, v_all = self.cache.update(layer, input_pos, k, v)
        return k_all[:, :, : self.length], v_all[:, :, : self.length]
