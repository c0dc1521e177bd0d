"""The server as a real subprocess on loopback, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ds_models import generate
from ds_serve.server import chat_prompt

NAME = "ds-tiny-test"


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(tiny, prompt: str, max_tokens: int) -> str:
    model, tok = tiny
    eos = tok.token_to_id("<|endoftext|>")
    out = generate(model, [tok.encode(prompt).ids], max_tokens, stop_tokens=[eos])[0]
    return tok.decode(out)


def metric_samples(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_completion_equals_greedy_generate(servers, tiny):
    r = client(servers["main"]).completions.create(model=NAME, prompt="the quick brown", max_tokens=12,
                                                   temperature=0)  # fmt: skip
    assert r.choices[0].text == reference(tiny, "the quick brown", 12)
    assert r.usage.prompt_tokens == len(tiny[1].encode("the quick brown").ids)
    assert r.usage.completion_tokens >= 1
    assert r.model == NAME


def test_seeded_sampling_is_reproducible(servers):
    c = client(servers["main"])

    def ask(seed):
        return c.completions.create(model=NAME, prompt="the lazy", max_tokens=24, temperature=1.5, seed=seed,
                                    extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip

    assert ask(3) == ask(3)
    assert len({ask(3), ask(4), ask(5)}) > 1


def test_chat_uses_the_template(servers, tiny):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello fox"}]
    r = client(servers["main"]).chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                                        temperature=0)  # fmt: skip
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(tiny, chat_prompt(messages), 10)


def test_streaming_concatenates_to_the_full_text(servers, tiny):
    c = client(servers["main"])
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="sparse models", max_tokens=20, temperature=0, stream=True)]  # fmt: skip
    assert len(pieces) >= 2
    assert "".join(pieces) == reference(tiny, "sparse models", 20)
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=8, temperature=0, stream=True)  # fmt: skip
    chunks = list(chat)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == reference(tiny, chat_prompt([{"role": "user", "content": "hi"}]), 8)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    raw = httpx.post(servers["main"].url + "/v1/completions",
                     json={"model": NAME, "prompt": "a", "max_tokens": 3, "stream": True}).text  # fmt: skip
    assert raw.rstrip().endswith("data: [DONE]")


def test_concurrent_requests_keep_greedy_outputs(servers, tiny):
    """8 requests of different lengths through 4 rows: requests join and leave mid-batch."""
    c = client(servers["main"])
    jobs = [(f"{w} fox and the dog", 5 + 7 * i) for i, w in enumerate("abcdefgh")]

    def ask(job):
        prompt, n = job
        return c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [reference(tiny, p, n) for p, n in jobs]
    batch = metric_samples(servers["main"])
    # Some decode step ran with more than one row.
    assert batch[("ds_serve_batch_size_count", ())] > batch[("ds_serve_batch_size_bucket", (("le", "1.0"),))]


def test_disconnect_cancels_and_frees_the_slot(servers):
    server = servers["main"]
    before = metric_samples(server).get(("ds_serve_finished_total", (("reason", "cancelled"),)), 0)
    stream = client(server).completions.create(model=NAME, prompt="the", max_tokens=2000, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        samples = metric_samples(server)
        if samples.get(("ds_serve_finished_total", (("reason", "cancelled"),)), 0) > before:
            break
        time.sleep(0.05)
    assert samples[("ds_serve_finished_total", (("reason", "cancelled"),))] == before + 1
    assert samples[("ds_serve_running_requests", ())] == 0


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/completions", timeout=30, **kw, **(
        {"content": body} if isinstance(body, (str, bytes)) else {"json": body}))  # fmt: skip


def assert_openai_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code


def test_bad_requests_get_openai_errors(servers):
    s = servers["main"]
    assert_openai_error(post(s, b"{not json", headers={"content-type": "application/json"}), 400)
    assert_openai_error(post(s, {"model": "gpt-4", "prompt": "x"}), 404, "model_not_found")
    r = post(s, {"model": NAME, "prompt": "fox " * 3000, "max_tokens": 4})
    assert_openai_error(r, 400, "context_length_exceeded")
    assert_openai_error(post(s, {"model": NAME, "prompt": [1, 2, 99999]}), 400)
    assert_openai_error(post(s, {"model": NAME, "prompt": "x", "max_tokens": "many"}), 400)
    assert_openai_error(post(s, {"model": NAME, "prompt": "x", "top_p": 0}), 400)
    assert_openai_error(post(s, {"model": NAME, "prompt": "x", "n": 2}), 400)
    assert_openai_error(post(s, b"x" * (2 << 20)), 413)
    assert_openai_error(post(s, b"[" * 200_000), 400)  # nesting deeper than the JSON parser's recursion
    r = httpx.post(s.url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "x"}]})
    assert_openai_error(r, 400)
    with pytest.raises(openai.NotFoundError):
        client(s).completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(s).completions.create(model=NAME, prompt="fox " * 3000)
    assert httpx.get(s.url + "/health").json()["status"] == "ok"  # still serving
    samples = metric_samples(s)
    assert samples[("ds_serve_requests_total", (("endpoint", "completions"), ("status", "404")))] >= 2


def test_api_key_and_overload(servers):
    s = servers["guarded"]
    with pytest.raises(openai.AuthenticationError):
        client(s, "wrong").completions.create(model=NAME, prompt="x", max_tokens=1)
    assert httpx.get(s.url + "/v1/models").status_code == 401
    models = client(s, "sekret").models.list()
    assert [m.id for m in models.data] == [NAME]
    # One row and a queue of one: of 6 simultaneous long requests at most 2 are taken, the rest get 429.
    c = client(s, "sekret")

    def ask(_):
        try:
            c.completions.create(model=NAME, prompt="fox", max_tokens=300, temperature=0,
                                 extra_body={"ignore_eos": True})  # fmt: skip
            return 200
        except openai.RateLimitError as e:
            assert e.body["code"] == "queue_full"
            return 429

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(ask, range(6)))
    assert codes.count(429) >= 4 and codes.count(200) >= 1


def test_request_timeout_answers_504(servers):
    r = post(servers["impatient"], {"model": NAME, "prompt": "fox", "max_tokens": 50})
    assert_openai_error(r, 504, "timeout")


def test_metrics_parse(servers):
    c = client(servers["main"])
    c.completions.create(model=NAME, prompt="fox", max_tokens=5, temperature=0)
    samples = metric_samples(servers["main"])
    assert samples[("ds_serve_requests_total", (("endpoint", "completions"), ("status", "200")))] >= 1
    assert samples[("ds_serve_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("ds_serve_time_per_output_token_seconds_count", ())] >= 1
    assert samples[("ds_serve_generated_tokens_total", ())] >= 5
    assert samples[("ds_serve_queue_length", ())] == 0
    assert ("ds_serve_tokens_per_second", ()) in samples


def test_sigterm_finishes_in_flight_requests(start_server):
    server = start_server("--max-batch", "2")
    stream = client(server).completions.create(model=NAME, prompt="fox", max_tokens=400, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    it = iter(stream)
    first = next(it).choices[0].text
    server.proc.send_signal(signal.SIGTERM)
    rest = [ch.choices[0].finish_reason for ch in it]
    assert rest[-1] == "length"  # ran to completion despite the SIGTERM
    assert first is not None
    assert server.proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)
