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
`TorchEngine` (ds_serve.engine) runs a ds_models.Transformer over a slot cache (CUDA graphs on CUDA);
ds_serve.onnx_engine.OnnxEngine runs a ds-quant ONNX export in onnxruntime (whole prompts).

Greedy outputs are the same as `ds_models.generate` for the same prompt: a row attends to its own
slot only (masked attention), at the same RoPE positions (slot index = position).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ds_models import Transformer
from ds_models.generate import sample
from ds_serve.engine import Engine, TorchEngine


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
