"""lm-evaluation-harness on a ds model: an offline local perplexity task equals a direct computation."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yaml = (
        (DATA / "ds_bench_ppl.yaml")
        .read_text()
        .replace("ds_bench_ppl.jsonl", str(DATA / "ds_bench_ppl.jsonl"))
    )
    (tmp_path / "ds_bench_ppl.yaml").write_text(yaml)
    return tmp_path


def direct_logprob(model_dir: Path, text: str) -> float:
    """log P(text | EOS) from one forward of the ds model: no harness, no windows."""
    from ds_models import Transformer, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = Transformer.from_pretrained(model_dir).eval()
    ids = [tok.token_to_id("<|endoftext|>"), *tok.encode(text, add_special_tokens=False).ids]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def test_perplexity_task_equals_direct_computation(varied_dir, task_dir, tmp_path, capsys):
    from ds_bench.cli import main

    out = tmp_path / "lm-eval.json"
    argv = ["lm-eval", "--model", str(varied_dir), "--tasks", "ds_bench_ppl", "--include-path", str(task_dir),
            "--only-include-path"]  # fmt: skip
    assert main([*argv, "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"]["ds_bench_ppl"]
    # A task the harness does not know: one line, exit 2.
    capsys.readouterr()
    assert main([*argv[:3], "--tasks", "ds_bench_nope", *argv[5:]]) == 2
    assert capsys.readouterr().err.strip() == "ds-bench: error: --tasks: unknown task 'ds_bench_nope'"

    docs = [json.loads(line)["text"] for line in (DATA / "ds_bench_ppl.jsonl").read_text().splitlines()]
    logprob = sum(direct_logprob(varied_dir, d) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-logprob / words), rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-logprob / nbytes), rel=1e-4)
    assert got["bits_per_byte,none"] == pytest.approx(-logprob / nbytes / math.log(2), rel=1e-4)


def test_rolling_windows_cover_long_documents(varied_dir):
    from lm_eval.api.instance import Instance

    from ds_bench.lm_eval_model import DsLM

    text = (DATA / "ds_bench_ppl.jsonl").read_text().splitlines()[1]
    doc = json.loads(text)["text"]
    full = DsLM(path=str(varied_dir))
    short = DsLM(path=str(varied_dir), max_length=16)  # many windows, each with less context
    req = [Instance("loglikelihood_rolling", {}, (doc,), 0)]
    a, b = full.loglikelihood_rolling(req)[0], short.loglikelihood_rolling(req)[0]
    assert a == pytest.approx(direct_logprob(varied_dir, doc), rel=1e-5)
    assert math.isfinite(b) and b != pytest.approx(a, rel=1e-6)


def test_loglikelihood_and_generate_until(varied_dir):
    from lm_eval.api.instance import Instance

    from ds_bench.lm_eval_model import DsLM
    from ds_models import Transformer, load_tokenizer

    lm = DsLM(path=str(varied_dir))
    ((lp, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, ("the cat sat", " on the mat"), 0)])
    # Directly: context and continuation tokenized apart (as the harness asks), one forward.
    tok = load_tokenizer(varied_dir)
    ctx, cont = tok.encode("the cat sat").ids, tok.encode(" on the mat").ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(Transformer.from_pretrained(varied_dir)(ids[:, :-1])[0].double(), dim=-1)[
            -len(cont) :
        ]
    target = torch.tensor(cont)
    assert lp == pytest.approx(float(logp[torch.arange(len(cont)), target].sum()), rel=1e-5)
    assert greedy == bool((logp.argmax(-1) == target).all())
    (text,) = lm.generate_until(
        [Instance("generate_until", {}, ("the dog", {"until": ["\n"], "max_gen_toks": 5}), 0)]
    )
    new_ids = []
    lm.backend.generate([tok.encode("the dog").ids], 5, lambda i, t, ts: new_ids.append(t[0]))
    assert text == tok.decode(new_ids).split("\n")[0]
