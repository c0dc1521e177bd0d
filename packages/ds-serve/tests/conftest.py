"""Fixtures: a ds-tiny model directory with a freshly trained tokenizer, and real server subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from ds_models import ModelConfig, Transformer

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "sparse models route every token through a few experts",
    "continuous batching lets requests join and leave the running batch",
    "a server answers many clients at once and reports its metrics",
] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """ds-tiny (context 2048, so generations can run long enough to cancel) with varied weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXT, trainer)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("ds-tiny", max_seq_len=2048)).eval()
    with torch.no_grad():  # registry init makes a tied tiny model echo its input; spread the weights
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("serve") / "ds-tiny-test"
    model.save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def onnx_dir(model_dir, tmp_path_factory) -> Path:
    """model_dir exported by ds-quant to ONNX (float32, KV-cache inputs/outputs)."""
    from ds_quant import export_directory

    return export_directory(model_dir, tmp_path_factory.mktemp("onnx") / "ds-tiny-test")


class ServerProcess:
    def __init__(self, model_dir: Path, *args: str, flag: str = "--model") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "ds_serve", "serve", flag, str(model_dir), "--port", str(self.port),
               "--threads", "1", *args]  # fmt: skip
        # A file, not a pipe (a full pipe would block the server); closed in stop().
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        import httpx  # here, so the in-process tests also run where only torch is installed (GPU machine)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"ds-serve exited with {self.proc.returncode}: {self.log.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("ds-serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def servers(model_dir):
    """Three servers started in parallel: main (continuous, 4 rows), guarded (API key, 1 row, queue of 1),
    and impatient (every request times out)."""
    procs = {
        "main": ServerProcess(model_dir, "--max-batch", "4"),
        "guarded": ServerProcess(model_dir, "--max-batch", "1", "--max-queue", "1", "--api-key", "sekret"),
        "impatient": ServerProcess(model_dir, "--request-timeout", "0.000001"),
    }
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture
def start_server(model_dir):
    """start_server(*args) -> a ready ServerProcess of its own (stopped after the test)."""
    started = []

    def start(*args: str, directory: Path | None = None, flag: str = "--model") -> ServerProcess:
        started.append(ServerProcess(directory or model_dir, *args, flag=flag))
        return started[-1].wait_ready()

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def tiny(model_dir):
    """The served model and tokenizer, loaded in-process, for reference generations."""
    from ds_models import load_tokenizer

    return Transformer.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)


@pytest.fixture
def run_requests():
    """run_requests(scheduler, reqs) submits every request and waits until all have finished."""
    import threading

    def run(scheduler, reqs: list, timeout: float = 60) -> list:
        done = [threading.Event() for _ in reqs]
        for req, ev in zip(reqs, done):
            req.on_event = lambda tok, ev=ev: ev.set() if tok is None else None
            scheduler.submit(req)
        for ev in done:
            assert ev.wait(timeout)
        return reqs

    return run
