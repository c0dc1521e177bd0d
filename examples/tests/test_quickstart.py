"""The README's main job at miniature size: every artefact exists and loads, and the summary holds the
numbers the tools measured (read back independently here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "quickstart.py"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    proc = subprocess.run(
        [sys.executable, str(QUICKSTART), "--mini", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_artefact_exists_and_loads(run_dir: Path) -> None:
    from ds_models import Transformer, load_tokenizer
    from ds_quant import OnnxModel

    for name in ("summary.md", "summary.json", "summary.png", "provenance.json", "eval.json", "bench.md"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = Transformer.from_pretrained(run_dir / "train" / "model")
    assert model.config.sparse_ratio == 0.3 and model.config.sparsity_mode == "static"
    tok = load_tokenizer(run_dir / "train" / "model")
    ids = tok.encode("The for statement").ids
    assert (run_dir / "int4" / "quant.yaml").is_file()

    # The int4 ONNX model generates with its KV cache; fp32 ONNX greedy equals PyTorch greedy.
    fp32 = OnnxModel(run_dir / "onnx-fp32")
    int4 = OnnxModel(run_dir / "onnx-int4")
    assert len(int4.generate([ids], max_new_tokens=4)[0]) >= 4
    from ds_models import generate

    torch_tokens = generate(model.eval(), [ids], max_new_tokens=4)
    onnx_tokens = fp32.generate([ids], max_new_tokens=4)
    assert [list(map(int, t))[-4:] for t in torch_tokens] == [list(map(int, t))[-4:] for t in onnx_tokens]

    prov = json.loads((run_dir / "provenance.json").read_text())
    assert [s["stage"] for s in prov["stages"]][:2] == ["train", "quantize"]
    assert all(s["exit"] == 0 for s in prov["stages"])


@pytest.mark.slow
def test_summary_numbers_are_the_measured_ones(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = {row["name"]: row for row in json.loads((run_dir / "eval.json").read_text())}
    for name in ("fp32", "int4"):
        row = summary["onnx"][name]
        bench = json.loads((run_dir / f"bench-{name}.json").read_text())
        assert row["tokens_per_s"] == bench["metrics"]["tokens_per_s"]["value"]
        assert row["loadgen"] == bench["loadgen"]["result"] == "VALID"
        assert row["perplexity"] == evals[f"onnx onnx-{name}"]["perplexity"]
        size = sum(f.stat().st_size for f in (run_dir / f"onnx-{name}").rglob("*") if f.is_file())
        assert row["onnx_bytes"] == size
    assert (
        summary["onnx"]["int4"]["size_vs_fp32"]
        == summary["onnx"]["int4"]["onnx_bytes"] / summary["onnx"]["fp32"]["onnx_bytes"]
    )
    losses = [
        json.loads(line)["loss"]
        for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert summary["train"]["final_loss"] == losses[-1]
    table = (run_dir / "summary.md").read_text()
    assert f"{summary['onnx']['int4']['perplexity']:.2f}" in table
    assert f"{summary['onnx']['fp32']['tokens_per_s']:.1f}" in table
