"""The scheduler: one background thread runs the model; requests join and leave at every step.

Continuous (iteration-level) batching, as in Orca / vLLM: the KV cache holds `max_batch` rows
("slots") of `max_len` positions each, shared by all requests. Each loop iteration

  1. drops finished, cancelled and timed-out requests (their slot is free at once),
  2. admits waiting requests in arrival order (FCFS: the head of the queue is never skipped, so a
     long prompt cannot starve) while a slot is free and the token budget allows,
  3. runs ONE step for every running request together, each row at its own position: a decode
     token for rows that are generating, the next chunk of the prompt for rows that are still
     prefilling (chunked prefill, as in Sarathi / vLLM: at most `step_tokens` prompt tokens per
     step, so a long prompt cannot stall everyone else's decoding). A row whose prompt is complete
     gets its first token from that step.

Fixed (static) batching, kept as the baseline, admits only when the running batch is empty: it
waits for a batch (up to `max_batch` requests, or `batch_wait_s`) and runs it to completion the way
`ds_models.generate` runs a batch: a row that has finished keeps its slot and its share of every
step until the longest row is done, and the whole batch is answered then. Both modes share the
same step code, so a benchmark compares scheduling and nothing else.

The model sits behind a small `Engine` interface (run token chunks into slots, release a slot):
`TorchEngine` runs a ds_models.Transformer over `SlotCache` (here; CUDA graphs on CUDA);
ds_serve.onnx_engine.OnnxEngine runs a ds-quant ONNX export in onnxruntime (whole prompts).

Greedy outputs are the same as `ds_models.generate` for the same prompt: a row attends to its own
slot only (masked attention), at the same RoPE positions (slot index = position).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ds_models import ModelConfig, Transformer
from ds_models.generate import sample
from ds_models.model import attention_bias, rope_cos_sin


class ServeError(ValueError):
    """A request the server cannot take; `status` is the HTTP code, `code` the OpenAI error code."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


@dataclass
class SchedulerConfig:
    max_batch: int = 8  # KV-cache rows = most requests decoding at once
    max_len: int | None = None  # positions per row; None = the model's max_seq_len
    token_budget: int | None = None  # sum over running requests of prompt + max_tokens; None = rows * max_len
    max_queue: int = 256  # waiting requests beyond this are refused (HTTP 429)
    batching: str = "continuous"  # "continuous" | "fixed"
    batch_wait_s: float = 0.05  # fixed batching: how long to wait for a batch to fill
    request_timeout_s: float | None = None  # from arrival to last token
    step_tokens: int = 256  # chunked prefill: most prompt tokens one step runs (decode tokens aside)
    prefill: str = "auto"  # "mixed" (chunks join the decode forward) | "separate" | "auto" (CUDA: mixed)
    cuda_graph: bool = True  # on CUDA, replay each step shape from a CUDA graph (no effect on CPU)

    def __post_init__(self) -> None:
        if self.batching not in ("continuous", "fixed"):
            raise ServeError(f"batching: expected continuous or fixed, got {self.batching!r}")
        if self.prefill not in ("auto", "mixed", "separate"):
            raise ServeError(f"prefill: expected auto, mixed or separate, got {self.prefill!r}")
        if self.step_tokens < 1:
            raise ServeError(f"step_tokens: expected >= 1, got {self.step_tokens}")
        if self.max_batch < 1:
            raise ServeError(f"max_batch: expected >= 1, got {self.max_batch}")
        if self.max_queue < 1:
            raise ServeError(f"max_queue: expected >= 1, got {self.max_queue}")


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: frozenset[int] = frozenset()
    seed: int | None = None
    # Filled in by the scheduler.
    id: int = 0
    arrival: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" | "shutdown" | "error"
    error: str | None = None
    cancelled: bool = False
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    done: str | None = None  # fixed batching: finished (this reason), waiting for the rest of its batch
    # Delivery to the asyncio side: called from the model thread with (token or None at the end).
    on_event: Callable[[int | None], None] | None = None
    generator: torch.Generator | None = None

    @property
    def need(self) -> int:
        return len(self.prompt) + self.max_tokens

    def cancel(self) -> None:
        """Safe from any thread: the scheduler frees the slot before its next step."""
        self.cancelled = True


class SlotCache:
    """KV cache of `rows` slots x `max_len` positions, written per row at per-row positions.

    Passed to the model's attention layers in place of ds_models.KVCache. A forward's batch entries
    are (a) a contiguous range of rows lo..lo+n_slice-1 (TorchEngine keeps the occupied rows packed
    at the bottom, so these keys are a view, never a gather), then (b) in mixed steps, one entry per
    prompt token, each reading its own row's keys through a gather. `update` writes every entry's
    new keys/values at (row, position) and returns each entry's key row cut to `length`. Each row
    has one more column, `scratch` (= max_len), where padding tokens write: no query reads it.
    """

    fixed_shapes = False  # ds_models: use the fused q/k/v weights (TorchEngine sets it with CUDA graphs)

    def __init__(self, model: Transformer, rows: int, max_len: int) -> None:
        c = model.config
        w = model.embed_tokens.weight
        # One tensor for all layers, k and v: a compaction move is then one copy, not 2 x n_layers.
        self.kv = torch.zeros(2, c.n_layers, rows, c.n_kv_heads, max_len + 1, c.head_dim,
                              dtype=w.dtype, device=w.device)  # (2, L, R, K, S + 1, D)  # fmt: skip
        self.k, self.v = list(self.kv[0]), list(self.kv[1])
        self.max_len = self.scratch = max_len
        self.lo, self.hi, self.length = 0, 0, 0
        self.index = self.pos = torch.zeros(0, 0, dtype=torch.long)  # (N, 1) rows, (N, T) positions
        self.gather: torch.Tensor | None = None  # (N,) rows to gather, when some entries are not the slice

    def bind(self, rows: torch.Tensor, pos: torch.Tensor, lo: int, n_slice: int, length: int) -> None:
        """The next forward: entry i at row rows[i] (rows lo.. for i < n_slice), positions pos (N, T),
        attending to keys 0..length-1."""
        self.index, self.pos, self.length = rows[:, None], pos, length
        self.lo, self.hi = lo, lo + n_slice
        self.gather = rows if n_slice < rows.shape[0] else None  # one gather of every entry's row

    def update(self, layer: int, input_pos, k: torch.Tensor, v: torch.Tensor):
        # k, v (N, K, T, D) -> (row, position) of each token; input_pos is unused (self.pos is per row)
        self.k[layer][self.index, :, self.pos] = k.transpose(1, 2)  # indexed view is (N, T, K, D)
        self.v[layer][self.index, :, self.pos] = v.transpose(1, 2)
        out = []
        for kv in (self.k[layer], self.v[layer]):
            if self.gather is None:
                out.append(kv[self.lo : self.hi, :, : self.length])  # (N, K, S, D), a view
            else:  # (N, K, S, D): one gather (cheaper than the slice's copy plus the prompt rows')
                out.append(kv[self.gather, :, : self.length])
        return out[0], out[1]

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy row src's first n positions to row dst (compaction when a request leaves)."""
        self.kv[:, :, dst, :, :n].copy_(self.kv[:, :, src, :, :n])


@torch.no_grad()
def forward_rows(model: Transformer, cache: SlotCache, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                 last: torch.Tensor, lo: int, n_slice: int, length: int) -> torch.Tensor:  # fmt: skip
    """Tokens ids (N, T) at positions pos (N, T), entry i in cache row rows[i] -> logits (M, vocab)
    float of the tokens `last` (M,) (flat indices into the N*T tokens).

    The model's own blocks, with RoPE and the causal mask built per entry from `pos`: a token
    attends to positions 0..pos of its own cache row. Entries 0..n_slice-1 are rows lo.. in order
    (their keys are a slice of the cache; see SlotCache). Padding tokens carry pos = cache.scratch
    (they see every key, write the unread scratch column, and their outputs are never selected).
    Nothing here syncs with the host, so a CUDA graph can record it (TorchEngine).
    """
    N, T = ids.shape
    cache.bind(rows, pos, lo, n_slice, length)
    c = model.config
    keys = torch.arange(length, device=ids.device)  # (S,)
    allowed = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (N, 1, T, S)
    x = model.embed_tokens(ids)  # (N, T, d_model)
    bias = attention_bias(allowed, c.n_heads // c.n_kv_heads, x.dtype)  # (N, 1, G*T, S), once per forward
    cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)  # (N, 1, T, D)
    for layer in model.layers:
        x = layer(x, cos, sin, bias, pos[0], cache)
    x = x.reshape(N * T, -1)[last]  # (M, d_model): lm_head only where logits are used
    return model.lm_head(model.norm(x)).float()  # (M, vocab)


Chunk = tuple[int, list[int], int]  # (slot, tokens, position of tokens[0])


class Engine:
    """What the scheduler needs from a model: run token chunks into slots, release a slot.

    `config` is the ds ModelConfig (vocab_size, max_seq_len), `device` where sampling runs.
    Slots are integers in [0, rows); the scheduler owns their allocation and tells the engine when
    one is released. An engine implements `step` (chunked prefill) or `prefill` + `decode` (whole
    prompts; `chunk_limit` then stays None).
    """

    config: ModelConfig
    device: torch.device
    max_len: int

    def chunk_limit(self, rows: int) -> int | None:
        """Most prompt tokens one row may bring to a step with `rows` rows; None = whole prompts only."""
        return None

    def step(self, chunks: list[Chunk]) -> torch.Tensor:
        """Each chunk's tokens into its slot at positions start.. -> logits (N, vocab) float of each
        chunk's last token. A decode is a chunk of one token; here prompts (start 0) go to
        `prefill`, the rest to `decode`."""
        pre = [i for i, c in enumerate(chunks) if c[2] == 0]
        dec = [i for i, c in enumerate(chunks) if c[2] != 0]
        out: list[torch.Tensor | None] = [None] * len(chunks)
        if pre:
            logits = self.prefill([chunks[i][0] for i in pre], [chunks[i][1] for i in pre])
            for i, row in zip(pre, logits):
                out[i] = row
        if dec:
            logits = self.decode([chunks[i][0] for i in dec], [chunks[i][1][-1] for i in dec],
                                 [chunks[i][2] for i in dec])  # fmt: skip
            for i, row in zip(dec, logits):
                out[i] = row
        return torch.stack(out)  # type: ignore[arg-type]

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run each prompt into its slot; logits (B, vocab) float of each prompt's last position."""
        raise NotImplementedError

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per slot, at its position -> logits (B, vocab) float."""
        raise NotImplementedError

    def release(self, slot: int) -> None:
        """The slot's request left; its cache may be reused."""


class TorchEngine(Engine):
    """A ds_models.Transformer over a SlotCache (the default engine).

    Rows: slot -> cache row, with the occupied rows always 0..n-1 (a leaving request's row is
    filled with the top row's keys), so the rows of a step are a slice of the cache, never a gather.

    Steps (`prefill`):
      mixed      one forward per step. Entries: one per row 0..B-1 (its decode token, or padding),
                 then one per prompt token of the step's chunks (flattened, as vLLM does: a prompt
                 token costs one token of arithmetic, decode rows pay nothing for it; its keys come
                 through a gather of its row). The default on CUDA, where a forward costs about the
                 same for 1 or a few hundred tokens and one forward per step beats two.
      separate   the prompt chunks in their own forward, (rows, T) over their row range, then a T = 1
                 forward for the decode tokens: the least arithmetic and no gather, the default on
                 CPU (measured in the design page).
    CUDA graphs (cuda_graph=True, CUDA only, as in vLLM): the mixed step is recorded once per shape
    bucket (rows 1, 2, 4, ... max_batch; prompt tokens 0, 16, 32, ... step_tokens; keys 64, 128, ...
    max_len) over static input buffers and replayed; a bucket's extra entries are padding. Graphs
    are captured lazily, the first time a shape is needed (`capture_all` records them up front).
    """

    def __init__(self, model: Transformer, rows: int, max_len: int | None = None, *, cuda_graph: bool = True,
                 prefill: str = "auto", step_tokens: int = 256) -> None:  # fmt: skip
        self.model = model.eval()
        self.config = model.config
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.cache = SlotCache(model, rows, self.max_len)
        self.device = self.cache.k[0].device
        self.rows, self.step_tokens = rows, step_tokens
        cuda = self.device.type == "cuda"
        self.mixed = prefill == "mixed" or (prefill == "auto" and cuda)
        self.cuda_graph = cuda_graph and cuda
        self.row_of: dict[int, int] = {}  # slot -> cache row; occupied rows are 0..len-1
        self.filled = [0] * rows  # positions written per row (what a compaction copies)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}  # (rows, prompt tokens, keys)
        if self.cuda_graph:
            for layer in model.layers:
                layer.self_attn.fuse_qkv()  # one q/k/v matmul (no-op for swapped / LoRA Linears)
            self.cache.fixed_shapes = True
            self.buckets = sorted({min(1 << i, rows) for i in range(rows.bit_length() + 1)})
            self._pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: one pool
            n = self._n = rows + step_tokens  # most entries of a graph
            # Static graph inputs, one buffer (one host-to-device copy per step): ids | pos | rows | last
            self._host = torch.zeros(3 * n + rows, dtype=torch.long).pin_memory()
            self._in = torch.zeros(3 * n + rows, dtype=torch.long, device=self.device)
            self._logits = torch.zeros(rows, model.config.vocab_size, device=self.device)  # output

    # ---- Engine ----

    def chunk_limit(self, rows: int) -> int:
        return self.step_tokens

    def step(self, chunks: list[Chunk]) -> torch.Tensor:
        rows = []
        for slot, tokens, start in chunks:
            row = self.row_of.setdefault(slot, len(self.row_of))
            self.filled[row] = max(self.filled[row], start + len(tokens))
            rows.append(row)
        prompt = [i for i, c in enumerate(chunks) if len(c[1]) > 1]
        rest = [i for i, c in enumerate(chunks) if len(c[1]) == 1]
        if self.mixed or not prompt or not rest:
            parts = [list(range(len(chunks)))]
        else:
            parts = [prompt, rest]  # separate: the prompt chunks' forward, then the decode forward
        out = None
        for part in parts:
            p_rows, p_chunks = [rows[i] for i in part], [chunks[i] for i in part]
            if self.mixed or self.cuda_graph:
                logits = self._run_mixed(p_rows, p_chunks)
            else:
                logits = self._run_rows(p_rows, p_chunks)
            if len(parts) == 1:
                return logits
            if out is None:
                out = torch.empty(len(chunks), self.config.vocab_size, device=self.device)
            out[part] = logits
        return out

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        return self.step([(s, p, 0) for s, p in zip(slots, prompts)])

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        return self.step([(s, [t], p) for s, t, p in zip(slots, tokens, positions)])

    def release(self, slot: int) -> None:
        row = self.row_of.pop(slot, None)
        if row is None:
            return
        top = len(self.row_of)  # the highest occupied row moves down into the hole
        if row != top:
            moved = next(s for s, r in self.row_of.items() if r == top)
            self.cache.move(top, row, self.filled[top])
            self.row_of[moved], self.filled[row] = row, self.filled[top]
        self.filled[top] = 0

    # ---- the forwards ----

    def _run_rows(self, rows: list[int], chunks: list[Chunk]) -> torch.Tensor:
        """(B, T) over the row range holding `rows`, T the longest chunk -> logits (N, vocab)."""
        lo, B = min(rows), max(rows) + 1 - min(rows)
        T = max(len(c[1]) for c in chunks)
        need = max(start + len(tokens) for _, tokens, start in chunks)  # keys attended
        S = min(self.max_len, -(-need // 64) * 64)  # rounded up: a new shape every 64 steps
        ids, pos, last = [[0] * T for _ in range(B)], [[self.cache.scratch] * T for _ in range(B)], [0] * B
        for row, (_, tokens, start) in zip(rows, chunks):
            n = len(tokens)
            ids[row - lo][:n], pos[row - lo][:n] = tokens, range(start, start + n)
            last[row - lo] = (row - lo) * T + n - 1  # flat index of the chunk's last token
        dev = self.device
        with self.attention_backends():
            logits = forward_rows(self.model, self.cache, torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                                  torch.arange(lo, lo + B, device=dev), torch.tensor(last, device=dev), lo, B, S)  # fmt: skip
        return self._select(logits, [r - lo for r in rows])

    def _run_mixed(self, rows: list[int], chunks: list[Chunk]) -> torch.Tensor:
        """One entry per row 0..B-1, then one per prompt token (T = 1) -> logits (N, vocab)."""
        need = max(start + len(tokens) for _, tokens, start in chunks)  # keys attended
        B = max(rows) + 1
        C = sum(len(c[1]) for c in chunks if len(c[1]) > 1)
        graph = self.cuda_graph
        if graph:
            B, C, S = self._bucket(B), self._c_bucket(C), self._s_bucket(need)
            graph = self._n >= B + C  # else (a chunk over step_tokens): eager
        if not graph:
            S = min(self.max_len, -(-need // 64) * 64)
        N = B + C
        ids, pos, where, last = [0] * N, [self.cache.scratch] * N, [*range(B), *[0] * C], list(range(B))
        j = B
        for row, (_, tokens, start) in zip(rows, chunks):
            n = len(tokens)
            if n == 1:  # the row's own entry
                ids[row], pos[row] = tokens[0], start
            else:  # flattened prompt tokens; the row's logits come from its chunk's last one
                ids[j : j + n], pos[j : j + n], where[j : j + n] = tokens, range(start, start + n), [row] * n
                last[row] = j + n - 1
                j += n
        if graph and (B, C, S) not in self.graphs:
            try:
                self.graphs[B, C, S] = self._capture(B, C, S)
            except RuntimeError as e:  # an op that cannot be captured must not cost the requests
                warnings.warn(f"ds-serve: CUDA graph capture failed ({e!r:.200}); running steps eagerly",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
                self.cuda_graph = graph = False
        if graph:
            logits = self._replay(B, C, S, ids, pos, where, last)
        else:
            dev = self.device
            with self.attention_backends():
                logits = forward_rows(self.model, self.cache, torch.tensor(ids, device=dev)[:, None],
                                      torch.tensor(pos, device=dev)[:, None], torch.tensor(where, device=dev),
                                      torch.tensor(last, device=dev), 0, B, S)  # fmt: skip
        return self._select(logits, rows)

    def _select(self, logits: torch.Tensor, index: list[int]) -> torch.Tensor:
        if index == list(range(len(logits))):
            return logits
        return logits[torch.tensor(index, device=self.device)]

    def attention_backends(self):
        """On CUDA, SDPA's memory-efficient kernel: it takes the per-row float mask in bf16 and fp32."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    # ---- CUDA graphs ----

    def _bucket(self, rows: int) -> int:
        return next((b for b in self.buckets if b >= rows), self.rows)

    def _c_bucket(self, need: int) -> int:
        if need == 0:
            return 0
        c = 16
        while c < need:
            c *= 2
        return min(c, max(self.step_tokens, need))

    def _s_bucket(self, need: int) -> int:
        s = 64
        while s < need:
            s *= 2
        return min(s, self.max_len)

    def capture_all(self) -> None:
        """Record every (rows, prompt tokens, keys) bucket now rather than at first use (server start)."""
        if not self.cuda_graph:
            return
        cs = sorted({self._c_bucket(c) for c in (0, *(1 << k for k in range(4, 20)), self.step_tokens)
                     if c <= self.step_tokens})  # fmt: skip
        ss = sorted({self._s_bucket(1 << k) for k in range(6, self.max_len.bit_length() + 1)})
        for B in reversed(self.buckets):  # largest first, as vLLM does: later captures reuse its memory
            for C in cs:
                for S in ss:
                    if (B, C, S) not in self.graphs and self._n >= B + C:
                        try:
                            self.graphs[B, C, S] = self._capture(B, C, S)
                        except RuntimeError as e:  # as in _run_mixed: serve eagerly rather than not at all
                            warnings.warn(f"ds-serve: CUDA graph capture failed ({e!r:.200}); running "
                                          "steps eagerly", RuntimeWarning, stacklevel=2)  # fmt: skip
                            self.cuda_graph = False
                            return

    def _views(self, B: int, C: int):
        n, N = self._n, B + C
        x = self._in
        return (
            x[:N, None],
            x[n : n + N, None],
            x[2 * n : 2 * n + N],
            x[3 * n : 3 * n + B],
        )  # ids, pos, rows, last

    def _replay(self, B: int, C: int, S: int, ids: list[int], pos: list[int], where: list[int],
                last: list[int]) -> torch.Tensor:  # fmt: skip
        n, N, h = self._n, B + C, self._host
        h[:N], h[n : n + N], h[2 * n : 2 * n + N] = torch.tensor(ids), torch.tensor(pos), torch.tensor(where)
        h[3 * n : 3 * n + B] = torch.tensor(last)
        self._in.copy_(h)  # one copy for all inputs (synchronous: the host buffer is reused next step)
        self.graphs[B, C, S].replay()
        return self._logits[:B]

    def _capture(self, B: int, C: int, S: int) -> torch.cuda.CUDAGraph:
        """Record forward_rows for one shape, as ds_models.generate's _CapturedStep does: warm-up runs
        on a side stream (kernel choice, workspaces), then the capture into the shared pool."""
        ids, pos, where, last = self._views(B, C)
        ids.zero_(), where.zero_(), last.zero_()
        pos.fill_(self.cache.scratch)  # the warm-up runs write only scratch columns: live rows stay intact
        where[:B].copy_(torch.arange(B, device=self.device))

        def run() -> None:
            self._logits[:B].copy_(forward_rows(self.model, self.cache, ids, pos, where, last, 0, B, S))

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with self.attention_backends(), torch.no_grad():
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: HTTP threads may touch CUDA (a request's seeded Generator) meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                run()
        return graph


class Scheduler:
    """Owns the model and the cache; `submit` from any thread, tokens come back through callbacks."""

    def __init__(self, model: Transformer | Engine, config: SchedulerConfig | None = None,
                 observer: Callable[[str, dict], None] | None = None) -> None:  # fmt: skip
        self.config = cfg = config or SchedulerConfig()
        self.engine = model if isinstance(model, Engine) else TorchEngine(
            model, cfg.max_batch, cfg.max_len, cuda_graph=cfg.cuda_graph, prefill=cfg.prefill,
            step_tokens=cfg.step_tokens,
        )  # fmt: skip
        self.max_len = self.engine.max_len
        self.token_budget = cfg.token_budget or cfg.max_batch * self.max_len
        self.observer = observer or (lambda event, data: None)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(cfg.max_batch))
        self.reserved = 0
        self.accepting = True
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ds-serve-scheduler", daemon=True)
        self._thread.start()

    # ---- API (any thread) ----

    def submit(self, req: Request) -> Request:
        vocab = self.engine.config.vocab_size
        if not req.prompt:
            raise ServeError("prompt: empty; at least one token is needed", param="prompt")
        if any(not 0 <= t < vocab for t in req.prompt):
            raise ServeError(f"prompt: token ids must lie in [0, {vocab})", param="prompt")
        if req.max_tokens < 1:
            raise ServeError(f"max_tokens: expected >= 1, got {req.max_tokens}", param="max_tokens")
        if req.need > self.max_len or req.need > self.token_budget:
            limit = min(self.max_len, self.token_budget)
            raise ServeError(
                f"this model's maximum context length is {limit} tokens; the request needs "
                f"{len(req.prompt)} prompt + {req.max_tokens} completion tokens",
                param="prompt", code="context_length_exceeded",
            )  # fmt: skip
        with self._cv:
            if not self.accepting:
                raise ServeError("server is shutting down", status=503, type="server_error",
                                 code="shutting_down")  # fmt: skip
            if len(self.waiting) >= self.config.max_queue:
                raise ServeError(f"server overloaded: {len(self.waiting)} requests waiting; retry later",
                                 status=429, type="rate_limit_error", code="queue_full")  # fmt: skip
            req.id, req.arrival = next(self._ids), time.monotonic()
            if req.seed is not None:
                req.generator = torch.Generator(device=self.engine.device).manual_seed(req.seed)
            self.waiting.append(req)
            self._cv.notify()
        return req

    def queue_length(self) -> int:
        return len(self.waiting)

    def batch_size(self) -> int:
        return len(self.running)

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop admitting; let running/waiting requests finish for up to drain_s, then fail the rest."""
        with self._cv:
            self.accepting = False
            self._cv.notify()
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and (self.running or self.waiting):
            time.sleep(0.02)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ---- the model thread ----

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.running and not self.waiting:
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    break
            try:
                self._iteration()
            except Exception as e:  # a model failure fails the batch, never the server
                for req in [*self.running]:
                    self._finish(req, "error", f"{type(e).__name__}: {e}")
                self.observer("error", {"where": "step"})
        with self._cv:
            leftover = [*self.running, *self.waiting]
            self.waiting.clear()
        for req in leftover:
            self._finish(req, "shutdown", "server shut down before the request finished")

    def _iteration(self) -> None:
        now = time.monotonic()
        timeout = self.config.request_timeout_s
        with self._cv:  # drop cancelled / timed-out waiting requests
            for req in [r for r in self.waiting if r.cancelled or (timeout and now - r.arrival > timeout)]:
                self.waiting.remove(req)
                reason = "cancelled" if req.cancelled else "timeout"
                self._finish(req, reason, None if req.cancelled else f"request timed out after {timeout} s")
        for req in [*self.running]:
            if req.cancelled:
                self._finish(req, "cancelled")
            elif timeout and now - req.arrival > timeout:
                self._finish(req, "timeout", f"request timed out after {timeout} s")
        self._admit()
        if self.running:
            self._step()

    def _admit(self) -> None:
        cfg = self.config
        if cfg.batching == "fixed":
            if self.running:
                return  # the batch runs to completion
            with self._cv:  # wait (briefly) for a full batch
                deadline = time.monotonic() + cfg.batch_wait_s
                while len(self.waiting) < cfg.max_batch and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(timeout=left)
        with self._cv:
            while (
                self.waiting and self.free_slots and self.reserved + self.waiting[0].need <= self.token_budget
            ):
                req = self.waiting.popleft()  # FCFS: only ever the head
                req.slot = self.free_slots.pop(0)
                self.reserved += req.need
                self.running.append(req)  # running stays in admission order: prompt chunks go FCFS

    def _step(self) -> None:
        """One forward (or two, engine's choice) for every running row: decode tokens and prompt chunks."""
        limit = self.engine.chunk_limit(len(self.running))  # None: the engine takes whole prompts
        budget = self.config.step_tokens
        chunks, owners = [], []
        for req in self.running:
            left = len(req.prompt) - req.prefilled
            if left > 0:
                if limit is None:
                    n = left
                elif budget > 0:
                    n = min(left, limit, budget)
                    budget -= n
                else:
                    continue  # this step's prompt tokens are spent; the row waits (decode rows go on)
                chunks.append((req.slot, req.prompt[req.prefilled : req.prefilled + n], req.prefilled))
            else:
                chunks.append((req.slot, [req.tokens[-1]], len(req.prompt) + len(req.tokens) - 1))
            owners.append(req)
        self.observer("step", {"batch": len(chunks)})
        logits = self.engine.step(chunks)  # (N, vocab) at each chunk's last token
        emit = []  # (row of logits, request) that get a token from this step
        for i, (req, (_, tokens, _)) in enumerate(zip(owners, chunks)):
            if req.prefilled < len(req.prompt):
                req.prefilled += len(tokens)
                if req.prefilled < len(req.prompt):
                    continue  # mid-prompt: no token yet
            elif req.done is not None:
                continue
            emit.append((i, req))
        for (_, req), tok in zip(emit, self._tokens(logits, emit)):
            self._emit(req, tok)
        if self.config.batching == "fixed" and all(r.done for r in self.running):
            for req in [*self.running]:
                self._finish(req, req.done or "length")

    def _tokens(self, logits: torch.Tensor, emit: list[tuple[int, Request]]) -> list[int]:
        """A token for each (logits row, request): one argmax over the greedy rows, one sample() per
        group of equal settings; a seeded request samples alone from its own generator (its tokens do
        not depend on who shares the batch). One host sync per group rather than per row."""
        out: list[int] = [0] * len(emit)
        groups: dict[tuple, list[int]] = {}
        for j, (_, req) in enumerate(emit):
            if req.temperature == 0:
                key: tuple = ("greedy",)
            else:
                key = (req.temperature, req.top_k, req.top_p) if req.generator is None else ("seeded", j)
            groups.setdefault(key, []).append(j)
        for members in groups.values():
            rows = [emit[j][0] for j in members]
            req = emit[members[0]][1]
            x = (
                logits
                if rows == list(range(len(logits)))
                else logits[torch.tensor(rows, device=logits.device)]
            )
            toks = sample(x, req.temperature, req.top_k, req.top_p, req.generator).tolist()
            for j, t in zip(members, toks):
                out[j] = t
        return out

    def _emit(self, req: Request, tok: int) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        req.tokens.append(tok)
        if req.on_event:
            req.on_event(tok)
        reason = "stop" if tok in req.stop_tokens else "length" if len(req.tokens) >= req.max_tokens else None
        if reason and self.config.batching == "fixed":
            req.done = reason  # a finished row of a static batch re-runs its last position until the end
        elif reason:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason, req.error, req.finished_at = reason, error, time.monotonic()
        if req in self.running:
            self.running.remove(req)
            self.free_slots.append(req.slot)
            self.free_slots.sort()
            self.engine.release(req.slot)
            self.reserved -= req.need
        self.observer("finish", {"request": req})
        if req.on_event:
            req.on_event(None)


def async_callback(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[int | None], None]:
    """A Request.on_event that hands tokens from the model thread to an asyncio queue."""

    def put(tok: int | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, tok)

    return put
