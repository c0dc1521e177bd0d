"""The engine: runs token chunks of many requests into the rows of one KV cache, in one forward.

`Engine` is what the scheduler (ds_serve.scheduler) needs from a model; `TorchEngine` runs a
ds_models.Transformer over `SlotCache`, each row at its own positions, with CUDA graphs on CUDA
(one per row / prompt-token / key-length bucket); ds_serve.onnx_engine.OnnxEngine runs a ds-quant
ONNX export in onnxruntime.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ds_models import ModelConfig, Transformer
from ds_models.model import attention_bias, rope_cos_sin


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
