"""`ds-serve serve --onnx DIR`: a ds-quant ONNX export served with continuous batching (onnxruntime)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading

import openai
import pytest

from ds_serve.onnx_engine import OnnxEngine
from ds_serve.scheduler import Request, Scheduler, SchedulerConfig

OnnxModel = pytest.importorskip("ds_quant", reason="the onnx extra (ds-quant) is not installed").OnnxModel
NAME = "ds-tiny-test"
PROMPTS = [[5, 6, 7, 8, 9], [17, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48], [3], [100, 200, 300], [9, 9]]
LENGTHS = [20, 5, 12, 30, 8, 3]


def test_onnx_engine_matches_onnx_generate_as_rows_join_and_leave(onnx_dir):
    """3 rows, 6 requests: rows are regrouped as requests finish and slots are reused."""
    model = OnnxModel(onnx_dir, threads=1)
    scheduler = Scheduler(OnnxEngine(model), SchedulerConfig(max_batch=3))
    done = [threading.Event() for _ in PROMPTS]
    try:
        reqs = [scheduler.submit(Request(prompt=p, max_tokens=n, on_event=lambda t, ev=ev: t is None and ev.set()))
                for p, n, ev in zip(PROMPTS, LENGTHS, done)]  # fmt: skip
        assert all(ev.wait(60) for ev in done)
    finally:
        scheduler.shutdown()
    assert [r.tokens for r in reqs] == [model.generate([p], n)[0] for p, n in zip(PROMPTS, LENGTHS)]
    # really joined mid-batch: the 4th request takes the row of the 2nd while the 1st still runs
    assert reqs[1].finished_at < reqs[3].first_token_at < reqs[0].finished_at


def test_onnx_server_answers_like_onnx_generate(onnx_dir, start_server):
    server = start_server("--max-batch", "3", directory=onnx_dir, flag="--onnx")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    reference = OnnxModel(onnx_dir, threads=1)
    eos = reference.tokenizer.token_to_id("<|endoftext|>")
    jobs = [(f"{w} fox and the lazy dog", 4 + 6 * i) for i, w in enumerate("abcdef")]

    def ask(job):
        prompt, n = job
        return c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    want = [reference.tokenizer.decode(reference.generate([reference.tokenizer.encode(p).ids], n,
                                                          stop_tokens=[eos])[0]) for p, n in jobs]  # fmt: skip
    assert got == want
    stream = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, stream=True)  # fmt: skip
    assert [ch.choices[0].finish_reason for ch in stream][-1] in ("stop", "length")


def test_onnx_without_ds_quant_names_the_extra(onnx_dir):
    """ds-quant is an optional extra: without it, --onnx fails with one line that says what to install."""
    code = ("import sys; sys.modules['ds_quant'] = None; from ds_serve.cli import main; "
            f"raise SystemExit(main(['serve', '--onnx', {str(onnx_dir)!r}]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "pip install 'ds-serve[onnx]'" in r.stderr and r.stderr.startswith("ds-serve: error: --onnx:")
