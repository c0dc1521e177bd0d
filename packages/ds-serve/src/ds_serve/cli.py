"""`ds-serve --model DIR`: load a ds model directory and serve it over HTTP (uvicorn).

SIGTERM / Ctrl-C: the server stops admitting (new requests get 503), running requests finish for up
to --drain seconds, whatever is left fails cleanly with a 503 error body, then the process exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ds_serve.__about__ import __version__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--version", action="version", version=f"ds-serve {__version__}")
    p.add_argument(
        "--model", required=True, help="ds model directory (config.yaml, model.safetensors, tokenizer.json)"
    )
    p.add_argument(
        "--model-name", default=None, help="name clients pass as 'model' (default: directory name)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache rows: requests decoding at once")
    p.add_argument("--max-len", type=int, default=None, help="positions per row (default: model max_seq_len)")
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="admit while running prompt+max_tokens sum stays under this (default: rows x max-len)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get HTTP 429")
    p.add_argument("--batching", choices=["continuous", "fixed"], default="continuous")
    p.add_argument(
        "--batch-wait", type=float, default=0.05, help="fixed batching: seconds to wait for a batch"
    )
    p.add_argument("--request-timeout", type=float, default=None, help="seconds from arrival to last token")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--drain", type=float, default=30.0, help="on shutdown, seconds running requests may finish"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch
    import uvicorn

    from ds_models import ModelError
    from ds_serve.scheduler import SchedulerConfig, ServeError
    from ds_serve.server import ServerConfig, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model, "config.yaml").is_file():
        print(f"ds-serve: error: {args.model}: config.yaml: not found; expected a ds model directory",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        app = create_app(
            args.model,
            SchedulerConfig(max_batch=args.max_batch, max_len=args.max_len, token_budget=args.token_budget,
                            max_queue=args.max_queue, batching=args.batching, batch_wait_s=args.batch_wait,
                            request_timeout_s=args.request_timeout),
            ServerConfig(model_name=args.model_name, api_key=args.api_key, drain_s=args.drain),
        )  # fmt: skip
    except (ServeError, ModelError) as e:
        print(f"ds-serve: error: {e}", file=sys.stderr)
        return 2
    scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.accepting = False  # new requests get 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=args.drain))  # fmt: skip
    # uvicorn re-raises the signal it caught once it has shut down; exiting through it means "done".
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_ok)
    server.run()
    return 0


def _exit_ok(sig, frame) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())
