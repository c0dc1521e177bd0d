"""ds-serve: serve a ds model (PyTorch) or its ONNX export over HTTP.

    ds-serve serve --model DIR [--config serve.yaml] [flags] [key=value ...]
    ds-serve serve --onnx DIR  ...        a `ds-quant export --onnx` directory (pip install 'ds-serve[onnx]')
    ds-serve --model DIR ...              short for `ds-serve serve --model DIR ...`

Settings come from the defaults, then --config YAML, then the flags given, then key=value (last
wins). The YAML file and the keys mirror the config dataclasses: top-level `model`, `onnx`, `host`,
`port`, `threads`; `scheduler.*` (SchedulerConfig: max_batch, max_len, token_budget, max_queue,
batching, batch_wait_s, request_timeout_s, step_tokens, prefill, cuda_graph); `server.*`
(ServerConfig: model_name, api_key, default_max_tokens, drain_s, keep_alive_s). Exit codes: 0 ok, 1 failed, 2 bad input (one line on stderr).

SIGTERM / Ctrl-C: the server stops admitting (new requests get 503), running requests finish for up
to `server.drain_s` seconds, whatever is left fails cleanly with a 503 error body, then it exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

from ds_serve.__about__ import __version__
from ds_serve.scheduler import SchedulerConfig, ServeError

PROG = "ds-serve"
SUBCOMMANDS = ("serve",)

# key, flag, type, help. Every key can also be set in the YAML file or as key=value.
SETTINGS: list[tuple[str, str, type, str]] = [
    ("model", "--model", str, "ds model directory (config.yaml, model.safetensors, tokenizer.json)"),
    ("onnx", "--onnx", str, "ONNX directory from `ds-quant export --onnx` (needs ds-serve[onnx])"),
    ("host", "--host", str, "listen address"),
    ("port", "--port", int, "listen port"),
    ("threads", "--threads", int, "torch / onnxruntime CPU threads (default: the library's)"),
    ("device", "--device", str, "--model: torch device, cpu | cuda | cuda:N"),
    ("dtype", "--dtype", str, "--model: fp32 | bf16 | fp16 (default: as stored)"),
    ("server.model_name", "--model-name", str, "name clients pass as 'model' (default: directory name)"),
    ("scheduler.max_batch", "--max-batch", int, "KV-cache rows: requests decoding at once"),
    ("scheduler.max_len", "--max-len", int, "positions per row (default: model max_seq_len)"),
    ("scheduler.token_budget", "--token-budget", int,
     "admit while running prompt+max_tokens sum stays under this (default: rows x max-len)"),
    ("scheduler.max_queue", "--max-queue", int, "waiting requests beyond this get HTTP 429"),
    ("scheduler.batching", "--batching", str, "continuous | fixed (static batches, the baseline)"),
    ("scheduler.batch_wait_s", "--batch-wait", float, "fixed batching: seconds to wait for a batch to fill"),
    ("scheduler.request_timeout_s", "--request-timeout", float, "seconds from arrival to last token"),
    ("scheduler.step_tokens", "--step-tokens", int,
     "chunked prefill: most prompt tokens one step runs, so long prompts cannot stall decoding"),
    ("scheduler.prefill", "--prefill", str,
     "mixed: prompt chunks join the decode forward | separate: their own forward | auto: mixed on CUDA"),
    ("scheduler.cuda_graph", "--no-cuda-graph", bool,
     "--model on CUDA: run steps eagerly instead of replaying captured CUDA graphs"),
    ("server.api_key", "--api-key", str, "require 'Authorization: Bearer KEY'"),
    ("server.default_max_tokens", "--default-max-tokens", int, "max_tokens when a request has none"),
    ("server.drain_s", "--drain", float, "on shutdown, seconds running requests may finish"),
    ("server.keep_alive_s", "--keep-alive", float,
     "seconds an idle keep-alive connection stays open (keep it above clients' own idle expiry)"),
]  # fmt: skip
CHOICES = {"scheduler.batching": ("continuous", "fixed"), "scheduler.prefill": ("auto", "mixed", "separate")}
TOP_DEFAULTS: dict[str, Any] = {
    "model": None,
    "onnx": None,
    "host": "127.0.0.1",
    "port": 8000,
    "threads": None,
    "device": "cpu",
    "dtype": None,
}


def defaults() -> dict[str, Any]:
    from ds_serve.server import ServerConfig

    out = dict(TOP_DEFAULTS)
    for prefix, cls in (("scheduler", SchedulerConfig), ("server", ServerConfig)):
        out.update({f"{prefix}.{f.name}": f.default for f in dataclasses.fields(cls)})
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage too)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_flags(p: argparse.ArgumentParser, values: dict[str, Any] | None) -> None:
    """values None: every default suppressed, to learn which flags were typed."""
    for key, flag, kind, help in SETTINGS:
        default = argparse.SUPPRESS if values is None else values[key]
        if kind is bool:  # an off switch: --no-cuda-graph sets the key to false
            p.add_argument(flag, dest=key, action="store_false", default=default, help=f"{help}; key {key}")
            continue
        choices = CHOICES.get(key)
        metavar = None if choices else flag[2:].upper().replace("-", "_")
        p.add_argument(flag, dest=key, type=kind, default=default, choices=choices, metavar=metavar,
                       help=f"{help}; key {key}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="serve a model directory (--model) or ONNX export (--onnx)",
                           description=__doc__.splitlines()[0], formatter_class=fmt)  # fmt: skip
    serve.add_argument("--config", help="YAML file of settings: the keys named below")
    _add_flags(serve, defaults())
    serve.add_argument("overrides", nargs="*", metavar="key=value",
                       help="settings overriding everything else, e.g. scheduler.max_batch=16")  # fmt: skip
    return parser


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flatten(data: dict) -> dict[str, Any]:
    """{"scheduler": {"max_batch": 4}} -> {"scheduler.max_batch": 4}."""
    out = {}
    for k, v in data.items():
        if k in ("scheduler", "server") and isinstance(v, dict):
            out.update({f"{k}.{sub}": x for sub, x in v.items()})
        else:
            out[str(k)] = v
    return out


def settings_from_args(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Defaults < --config YAML < flags typed < key=value; every value checked against its type."""
    import yaml

    settings = defaults()
    layers: list[tuple[str, dict[str, Any]]] = []
    if args.config:
        path = Path(args.config)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, IsADirectoryError):
            raise ServeError(f"--config: {path}: no such file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ServeError(f"{path}: {f'line {mark.line + 1}: ' if mark else ''}invalid YAML") from None
        if data is not None and not isinstance(data, dict):
            raise ServeError(f"{path}: expected a mapping of setting: value")
        layers.append((str(path), _flatten(data or {})))
    typed = _Parser(add_help=False)
    _add_flags(typed, None)
    known, _ = typed.parse_known_args(argv)
    layers.append(("flags", vars(known)))
    over = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServeError(f"override {item!r}: expected key=value (e.g. scheduler.max_batch=16)")
        over[key] = _parse_value(value)
    layers.append(("overrides", over))
    kinds = {key: kind for key, _, kind, _ in SETTINGS}
    for where, values in layers:
        for key, value in values.items():
            if key not in settings:
                raise ServeError(f"{where}: {key}: unknown setting; expected one of {', '.join(settings)}")
            kind = kinds.get(key, type(settings[key]))
            if value is not None and kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if value is not None and not (
                isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            ):
                raise ServeError(f"{where}: {key}: expected {kind.__name__}, got {value!r}")
            settings[key] = value
    if (settings["model"] is None) == (settings["onnx"] is None):
        raise ServeError("--model / --onnx: expected exactly one model directory")
    return settings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]  # `ds-serve --model DIR` is short for `ds-serve serve --model DIR`
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args, argv[1:])
        return serve(settings)
    except ServeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def serve(settings: dict[str, Any]) -> int:
    import uvicorn

    from ds_models import ModelError
    from ds_serve.server import ServerConfig, create_app

    def section(prefix: str) -> dict[str, Any]:
        return {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith(prefix + ".")}

    directory = Path(settings["onnx"] or settings["model"])
    flag = "--onnx" if settings["onnx"] else "--model"
    expected = "model.onnx" if settings["onnx"] else "config.yaml"
    if not (directory / expected).is_file():
        what = (
            "an ONNX directory from `ds-quant export --onnx`" if settings["onnx"] else "a ds model directory"
        )
        raise ServeError(f"{flag}: {directory}: {expected}: not found; expected {what}")
    scheduler_config = SchedulerConfig(**section("scheduler"))
    server_config = ServerConfig(**section("server"))
    if settings["threads"]:
        import torch

        torch.set_num_threads(settings["threads"])
    try:
        app = create_app(directory, scheduler_config, server_config, onnx=bool(settings["onnx"]),
                         threads=settings["threads"], device=settings["device"], dtype=settings["dtype"])  # fmt: skip
    except (ModelError, RuntimeError) as e:  # RuntimeError: e.g. --device cuda without a GPU
        raise ServeError(f"{flag}: {directory}: {e}".splitlines()[0]) from None
    scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.accepting = False  # new requests get 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=settings["host"], port=settings["port"], log_level="warning",
                                   timeout_graceful_shutdown=server_config.drain_s,
                                   timeout_keep_alive=server_config.keep_alive_s))  # fmt: skip
    # uvicorn re-raises the signal it caught once it has shut down; exiting through it means "done".
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_ok)
    server.run()
    return 0


def _exit_ok(sig, frame) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
