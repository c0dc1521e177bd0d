"""The HTTP server: OpenAI-compatible completions and chat, /v1/models, /health, /metrics.

Every request body is validated here by hand (no pydantic model per endpoint: the few fields are
checked with messages that name them); errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`. Tokens arrive from the scheduler thread through
an asyncio queue per request; a client that disconnects cancels its request, which frees its slot.

Chat template (role-tagged concatenation, so any tokenizer works): every message becomes
`<|{role}|>\\n{content}\\n`, and `<|assistant|>\\n` is appended for the reply.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ds_models import Transformer, load_tokenizer
from ds_serve.engine import TorchEngine
from ds_serve.metrics import Metrics
from ds_serve.scheduler import Request as GenRequest
from ds_serve.scheduler import Scheduler, SchedulerConfig, ServeError, async_callback

MAX_BODY_BYTES = 1 << 20  # a prompt larger than this cannot fit any ds context anyway
EOS = "<|endoftext|>"
ROLES = ("system", "user", "assistant", "tool")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ServerConfig:
    model_name: str | None = None  # the name clients pass as "model"; None = the directory's name
    api_key: str | None = None
    default_max_tokens: int = 16
    drain_s: float = 30.0  # on shutdown, how long running requests may finish
    # How long an idle keep-alive connection stays open. Above the idle expiry of common clients
    # (httpx and the OpenAI SDK drop theirs after 5 s): at uvicorn's own 5 s the server can close
    # a connection just as a client sends a request on it, which the client sees as a ReadError.
    keep_alive_s: float = 65.0


def chat_prompt(messages: list[dict]) -> str:
    """The chat template: role-tagged concatenation, then the assistant tag."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:  # fmt: skip
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def create_app(model_dir: str | Path, scheduler_config: SchedulerConfig | None = None,
               server_config: ServerConfig | None = None, *, onnx: bool = False, threads: int | None = None,
               device: str | None = None, dtype: str | None = None) -> FastAPI:  # fmt: skip
    """Load the model directory and build the app; the scheduler starts now and stops with the app.

    onnx: `model_dir` is a ds-quant ONNX export (model.onnx), run by onnxruntime (needs ds-serve[onnx];
    threads: its intra-op threads). Otherwise the PyTorch model is loaded on `device` ("cpu", "cuda",
    "cuda:1"; default cpu) in `dtype` (fp32 | bf16 | fp16; default: as stored).
    """
    model_dir = Path(model_dir)
    scheduler_config = scheduler_config or SchedulerConfig()
    if onnx:
        from ds_serve.onnx_engine import OnnxEngine, load_onnx

        onnx_model, tokenizer = load_onnx(model_dir, threads)
        engine = OnnxEngine(onnx_model, scheduler_config.max_len)
    else:
        if dtype is not None and dtype not in DTYPES:
            raise ServeError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        try:
            dev = torch.device(device or "cpu")
        except RuntimeError:
            raise ServeError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ServeError(f"--device: {device}: this torch has no CUDA device available")
        model = Transformer.from_pretrained(model_dir, device=dev, dtype=DTYPES.get(dtype))
        sc = scheduler_config
        engine = TorchEngine(model, sc.max_batch, sc.max_len, cuda_graph=sc.cuda_graph, prefill=sc.prefill,
                             step_tokens=sc.step_tokens)  # fmt: skip
        engine.capture_all()  # CUDA graphs: every step shape now, so no request pays a capture later
        tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ServeError(f"{model_dir}: tokenizer.json: missing; the server needs a tokenizer")
    cfg = server_config or ServerConfig()
    name = cfg.model_name or model_dir.resolve().name
    metrics = Metrics()
    scheduler = Scheduler(engine, scheduler_config, observer=metrics.observe)
    metrics.bind(scheduler)
    eos = tokenizer.token_to_id(EOS)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(scheduler.shutdown, cfg.drain_s)

    app = FastAPI(title="ds-serve", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def fail(err: ServeError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint=endpoint, status=str(err.status)).inc()
        metrics.errors.labels(type=err.type).inc()
        return JSONResponse(error_body(str(err), err.type, err.param, err.code), status_code=err.status)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            raise ServeError("invalid or missing API key (send 'Authorization: Bearer KEY')", status=401,
                             code="invalid_api_key")  # fmt: skip

    async def read_body(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise ServeError(f"request body of {size} bytes exceeds {MAX_BODY_BYTES}", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ServeError(f"request body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ServeError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ServeError("request body: expected a JSON object")
        if body.get("model") != name:
            raise ServeError(f"model {body.get('model')!r} does not exist; this server serves {name!r}",
                             status=404, param="model", code="model_not_found")  # fmt: skip
        return body

    def gen_request(body: dict, prompt: list[int]) -> GenRequest:
        def number(field: str, default, kind=float, lo=None, hi=None):
            v = body.get(field)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                raise ServeError(f"{field}: expected {'a number' if kind is float else 'an integer'}",
                                 param=field)  # fmt: skip
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ServeError(f"{field}: {v} outside [{lo}, {hi}]", param=field)
            return kind(v)

        if number("n", 1, int, 1) != 1:
            raise ServeError("n: only n=1 is supported", param="n")
        temperature = number("temperature", 1.0, float, 0, 2)  # OpenAI's default
        top_p = number("top_p", None, float, 0, 1)
        if top_p == 0:
            raise ServeError("top_p: expected a number in (0, 1]", param="top_p")
        return GenRequest(
            prompt=prompt,
            max_tokens=number("max_tokens", cfg.default_max_tokens, int, 1),
            temperature=temperature,
            top_p=None if top_p == 1 else top_p,
            stop_tokens=frozenset() if eos is None or body.get("ignore_eos") else frozenset({eos}),
            seed=number("seed", None, int),
        )

    async def run(request: Request, body: dict, prompt: list[int], chat: bool, endpoint: str):
        req = gen_request(body, prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req.on_event = async_callback(loop, queue)
        scheduler.submit(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.get("stream"):
            metrics.requests.labels(endpoint=endpoint, status="200").inc()
            return StreamingResponse(stream(req, queue, rid, chat), media_type="text/event-stream")
        while True:  # non-streaming: wait, watching for a client that went away
            try:
                tok = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    metrics.requests.labels(endpoint=endpoint, status="499").inc()
                    return Response(status_code=499)
                continue
            if tok is None:
                break
        finished(req)
        text = tokenizer.decode(req.tokens)
        finish = "stop" if req.finish_reason == "stop" else "length"
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})  # fmt: skip
        metrics.requests.labels(endpoint=endpoint, status="200").inc()
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": name, "choices": [choice],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(req.tokens),
                      "total_tokens": len(prompt) + len(req.tokens)},
        })  # fmt: skip

    def finished(req: GenRequest) -> None:
        if req.finish_reason == "timeout":
            raise ServeError(req.error or "timed out", status=504, type="timeout_error", code="timeout")
        if req.finish_reason in ("shutdown", "error", "cancelled"):
            status = 503 if req.finish_reason == "shutdown" else 500
            raise ServeError(req.error or req.finish_reason, status=status, type="server_error",
                             code=req.finish_reason)  # fmt: skip

    async def stream(req: GenRequest, queue: asyncio.Queue, rid: str, chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        sent = ""
        try:
            if chat:
                yield chunk(None, None, role=True)
            while await queue.get() is not None:
                text = tokenizer.decode(req.tokens)
                if not text.endswith("\ufffd") and len(text) > len(sent):  # hold partial UTF-8 sequences
                    yield chunk(text[len(sent) :], None)
                    sent = text
            try:
                finished(req)
            except ServeError as e:
                metrics.errors.labels(type=e.type).inc()
                yield f"data: {json.dumps(error_body(str(e), e.type, e.param, e.code))}\n\n"
                return
            text = tokenizer.decode(req.tokens)
            yield chunk(text[len(sent) :] or None, "stop" if req.finish_reason == "stop" else "length")
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # a no-op when finished; frees the slot when the client went away

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            check_key(request)
            body = await read_body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # the openai client sends a one-element batch as a list
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt).ids
            elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                ids = list(prompt)
            else:
                raise ServeError("prompt: expected a string or a list of token ids", param="prompt")
            return await run(request, body, ids, chat=False, endpoint="completions")
        except ServeError as e:
            return fail(e, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            body = await read_body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ServeError("messages: expected a non-empty list", param="messages")
            for i, m in enumerate(messages):
                if (
                    not isinstance(m, dict)
                    or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)
                ):
                    raise ServeError(f"messages[{i}]: expected {{'role': one of {', '.join(ROLES)}, "
                                     "'content': a string}", param=f"messages[{i}]")  # fmt: skip
            ids = tokenizer.encode(chat_prompt(messages)).ids
            return await run(request, body, ids, chat=True, endpoint="chat_completions")
        except ServeError as e:
            return fail(e, "chat_completions")

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ServeError as e:
            return fail(e, "models")
        metrics.requests.labels(endpoint="models", status="200").inc()
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "ds"}],
        }

    @app.get("/health")
    async def health():
        ok = scheduler.accepting
        return JSONResponse({"status": "ok" if ok else "shutting_down", "running": scheduler.batch_size(),
                             "waiting": scheduler.queue_length()}, status_code=200 if ok else 503)  # fmt: skip

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
