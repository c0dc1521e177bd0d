"""The scheduler: one background thread runs the model; requests join and leave at every step.

Continuous (iteration-level) batching, as in Orca / vLLM: the KV cache holds `max_batch` rows
("slots") of `max_len` positions each, shared by all requests. Each loop iteration

  1. drops finished, cancelled and timed-out requests (their slot is free at once),
  2. admits waiting requests in arrival order (FCFS: the head of the queue is never skipped, so a
     long prompt cannot starve) while a slot is free and the token budget allows; the admitted
     prompts are prefilled together (one forward, right-padded), each into its own slot,
  3. runs ONE decode step for every running request together, each row at its own position.

Fixed (static) batching, kept as the baseline, admits only when the running batch is empty: it
waits for a batch (up to `max_batch` requests, or `batch_wait_s`) and runs it to completion the way
`ds_models.generate` runs a batch: a row that has finished keeps its slot and its share of every
step until the longest row is done, and the whole batch is answered then. Both modes share the
same step code, so a benchmark compares scheduling and nothing else.

The model sits behind a small `Engine` interface (prefill prompts into slots, decode slots by one
token, release a slot): `TorchEngine` runs a ds_models.Transformer over `SlotCache` (here);
ds_serve.onnx_engine.OnnxEngine runs a ds-quant ONNX export in onnxruntime.

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

    def __post_init__(self) -> None:
        if self.batching not in ("continuous", "fixed"):
            raise ServeError(f"batching: expected continuous or fixed, got {self.batching!r}")
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

    Passed to the model's attention layers in place of ds_models.KVCache: `update` writes the new
    keys/values of the running rows and returns their cache rows, cut to the longest live length
    (attention beyond it would only be masked out).
    """

    fixed_shapes = False  # ds_models: use the unfused q/k/v Linears

    def __init__(self, model: Transformer, rows: int, max_len: int) -> None:
        c = model.config
        w = model.embed_tokens.weight
        shape = (rows, c.n_kv_heads, max_len, c.head_dim)  # (R, K, S, D)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(c.n_layers)]
        self.slots = torch.zeros(0, dtype=torch.long)  # (B,) rows the current forward touches
        self.pos = torch.zeros(0, 0, dtype=torch.long)  # (B, T) positions written by it
        self.length = 0  # keys attended: positions 0..length-1
        self.max_len = max_len

    def update(self, layer: int, input_pos, k: torch.Tensor, v: torch.Tensor):
        # k, v (B, K, T, D) -> rows self.slots at positions self.pos (B, T)
        rows = self.slots[:, None].expand_as(self.pos)  # (B, T)
        self.k[layer][rows, :, self.pos] = k.permute(0, 2, 1, 3)  # index result is (B, T, K, D)
        self.v[layer][rows, :, self.pos] = v.permute(0, 2, 1, 3)
        if self.contiguous:
            return (self.k[layer][: len(self.slots), :, : self.length],
                    self.v[layer][: len(self.slots), :, : self.length])  # fmt: skip
        return self.k[layer][self.slots, :, : self.length], self.v[layer][self.slots, :, : self.length]

    def set_batch(self, slots: list[int], pos: torch.Tensor) -> None:
        self.slots = torch.tensor(slots, dtype=torch.long, device=self.k[0].device)
        self.pos = pos
        # Attended keys rounded up to a multiple of 64 (the rest is masked): decode shapes then change
        # every 64 steps instead of every step (fewer distinct shapes for shape-keyed kernel caches).
        self.length = min(self.max_len, -(-(int(pos.max()) + 1) // 64) * 64)
        self.contiguous = slots == list(range(len(slots)))


@torch.no_grad()
def forward_rows(model: Transformer, cache: SlotCache, ids: torch.Tensor, slots: list[int],
                 pos: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """ids (B, T) at positions pos (B, T) of cache rows `slots` -> logits (B, vocab) at column `last`
    of each row (default: the last column).

    The model's own blocks, with RoPE and the causal mask built per row: a row attends to its own
    slot's positions 0..pos only.
    """
    cache.set_batch(slots, pos)
    keys = torch.arange(cache.length, device=ids.device)  # (S,)
    allowed = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, S)
    c = model.config
    x = model.embed_tokens(ids)  # (B, T, d_model)
    bias = attention_bias(allowed, c.n_heads // c.n_kv_heads, x.dtype)  # (B, 1, G*T, S)
    cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
    for layer in model.layers:  # input_pos is unused by SlotCache.update (it reads cache.pos)
        x = layer(x, cos, sin, bias, pos[0], cache)
    x = x[:, -1] if last is None else x[torch.arange(len(x), device=x.device), last]  # (B, d_model)
    return model.lm_head(model.norm(x)).float()  # (B, vocab)


class Engine:
    """What the scheduler needs from a model: prefill prompts into slots, decode slots by one token.

    `config` is the ds ModelConfig (vocab_size, max_seq_len), `device` where sampling runs.
    Slots are integers in [0, rows); the scheduler owns their allocation and tells the engine when
    one is released.
    """

    config: ModelConfig
    device: torch.device
    max_len: int

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run each prompt into its slot; logits (B, vocab) float of each prompt's last position."""
        raise NotImplementedError

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per slot, at its position -> logits (B, vocab) float."""
        raise NotImplementedError

    def release(self, slot: int) -> None:
        """The slot's request left; its cache may be reused."""


class TorchEngine(Engine):
    """A ds_models.Transformer over a SlotCache (the default engine)."""

    def __init__(self, model: Transformer, rows: int, max_len: int | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.cache = SlotCache(model, rows, self.max_len)
        self.device = self.cache.k[0].device

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        # Right-padded with token 0: a padded position's keys are written after the prompt, where the
        # row's first decode step overwrites them before any query of the row can attend to them.
        T = max(map(len, prompts))
        ids = torch.tensor(
            [p + [0] * (T - len(p)) for p in prompts], dtype=torch.long, device=self.device
        )  # (B, T)
        pos = torch.arange(T, device=self.device).expand(len(prompts), T)  # (B, T)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # (B,)
        with self.attention_backends():
            return forward_rows(self.model, self.cache, ids, slots, pos, last)

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        with self.attention_backends():
            return forward_rows(self.model, self.cache, ids, slots, pos)

    def attention_backends(self):
        """On CUDA, SDPA's memory-efficient kernel: it takes the per-row float mask in bf16 and fp32."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class Scheduler:
    """Owns the model and the cache; `submit` from any thread, tokens come back through callbacks."""

    def __init__(self, model: Transformer | Engine, config: SchedulerConfig | None = None,
                 observer: Callable[[str, dict], None] | None = None) -> None:  # fmt: skip
        self.config = cfg = config or SchedulerConfig()
        self.engine = model if isinstance(model, Engine) else TorchEngine(model, cfg.max_batch, cfg.max_len)
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
            self._decode()

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
        admitted = []
        with self._cv:
            while (
                self.waiting and self.free_slots and self.reserved + self.waiting[0].need <= self.token_budget
            ):
                req = self.waiting.popleft()  # FCFS: only ever the head
                req.slot = self.free_slots.pop(0)  # lowest free row keeps the batch contiguous
                self.reserved += req.need
                admitted.append(req)
        if admitted:
            logits = self.engine.prefill(
                [r.slot for r in admitted], [r.prompt for r in admitted]
            )  # (B, vocab)
            self.running.extend(admitted)
            self.running.sort(key=lambda r: r.slot)
            for req, row in zip(admitted, logits):
                self._emit(req, self._sample(req, row))

    def _decode(self) -> None:
        reqs = self.running
        self.observer("step", {"batch": len(reqs)})
        logits = self.engine.decode([r.slot for r in reqs], [r.tokens[-1] for r in reqs],
                                    [len(r.prompt) + len(r.tokens) - 1 for r in reqs])  # fmt: skip
        greedy = logits.argmax(dim=-1).tolist()
        for i, req in enumerate([*reqs]):
            if req.done is None:
                self._emit(req, greedy[i] if req.temperature == 0 else self._sample(req, logits[i]))
        if self.config.batching == "fixed" and all(r.done for r in self.running):
            for req in [*self.running]:
                self._finish(req, req.done or "length")

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        return int(sample(logits[None], req.temperature, req.top_k, req.top_p, req.generator)[0])

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
