"""The ds-quant command line: the README's user path, eval, and bad input (exit 2, one line, no output)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ds_quant.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quant_cli_user_path(tmp_path, capsys, tiny_dir, text_file):
    q, onnx_dir = tmp_path / "tiny-int4", tmp_path / "tiny-int4-onnx"
    code, out, err = run(capsys, "quantize", "--model", tiny_dir, "--out", q, "--bits", 4, "--group-size", 32,
                         "--method", "gptq", "--calib", text_file, "gptq.n_samples=8", "gptq.seq_len=64")  # fmt: skip
    assert code == 0, err
    assert "4-bit gptq" in out and (q / "quant.yaml").exists() and (q / "tokenizer.json").exists()
    assert json.loads((q / "provenance.json").read_text())["quantization"]["gptq"]["n_samples"] == 8

    code, out, err = run(capsys, "export", "--onnx", "--model", q, "--out", onnx_dir)
    assert code == 0, err
    assert (onnx_dir / "model.onnx").exists()

    code, out, err = run(capsys, "verify", "--onnx", onnx_dir, "--prompts", 2, "--seq-len", 8)
    assert code == 0, out + err
    assert out.count("ok: ") == 2 and "FAILED" not in out

    code, out, err = run(
        capsys, "generate", "--onnx", onnx_dir, "--prompt", "The Python", "--max-new-tokens", 6
    )
    assert code == 0, err
    assert out.startswith("The Python") and len(out.strip()) > len("The Python")
    code, out, err = run(
        capsys, "generate", "--onnx", onnx_dir, "--prompt", "1 2 3", "--ids", "--max-new-tokens", 4
    )
    assert code == 0 and len(out.split()) == 4


def test_quant_cli_verify_fails_against_the_wrong_model(tmp_path, capsys, tiny_dir, make_tiny):
    run(capsys, "export", "--onnx", "--model", tiny_dir, "--out", tmp_path / "o")
    other = tmp_path / "other"
    make_tiny(seed=1).save_pretrained(other)
    code, out, _ = run(capsys, "verify", "--onnx", tmp_path / "o", "--model", other)
    assert code == 1 and "FAILED" in out


def test_quant_cli_eval_table(tmp_path, capsys, tiny_dir, text_file):
    out_json = tmp_path / "eval.json"
    code, out, err = run(capsys, "eval", "--model", tiny_dir, "--text", text_file, "--bits", 32, 8, 4,
                         "--group-size", 32, "--seq-len", 64, "--max-windows", 4, "--json", out_json)  # fmt: skip
    assert code == 0, err
    assert "perplexity" in out and "int4 rtn" in out
    rows = {r["name"]: r for r in json.loads(out_json.read_text())}
    assert set(rows) == {"float32", "int8 rtn", "int4 rtn"}
    assert rows["float32"]["tokens"] == 4 * 63
    fp, i8 = rows["float32"]["perplexity"], rows["int8 rtn"]["perplexity"]
    assert abs(i8 / fp - 1) < 0.05 and i8 != fp
    assert (
        rows["int4 rtn"]["weight_bytes"] < rows["int8 rtn"]["weight_bytes"] < rows["float32"]["weight_bytes"]
    )


def _bad_inputs(tmp_path, tiny_dir, quantized):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_dir / "config.yaml", no_weights / "config.yaml")
    out = tmp_path / "out"
    return {
        "bits": (["quantize", "--model", tiny_dir, "--out", out, "--bits", 3], "--bits|bits: unsupported bit width 3"),
        "group": (["quantize", "--model", tiny_dir, "--out", out, "--group-size", 100], "group_size"),
        "export bits": (["export", "--onnx", "--model", tiny_dir, "--out", out, "--bits", 5], "--bits"),
        "missing weights": (["export", "--onnx", "--model", no_weights, "--out", out], "model.safetensors"),
        "missing dir": (["quantize", "--model", tmp_path / "nope", "--out", out], "no such model directory"),
        "quantized": (["quantize", "--model", quantized, "--out", out], "already quantized"),
        "quantized export": (["export", "--onnx", "--model", quantized, "--out", out, "--bits", 4], "already quantized"),
        "exists": (["export", "--onnx", "--model", tiny_dir, "--out", quantized], "already exists"),
        "gptq calib": (["quantize", "--model", tiny_dir, "--out", out, "--method", "gptq"], "--calib"),
        "calib file": (["quantize", "--model", tiny_dir, "--out", out, "--method", "gptq", "--calib", tmp_path / "x.txt"], "file not found"),
        "key": (["quantize", "--model", tiny_dir, "--out", out, "gptq.dampp=0.1"], "gptq.dampp"),
        "override": (["quantize", "--model", tiny_dir, "--out", out, "--keep", "lm_haed"], "matches no module"),
        "onnx dir": (["generate", "--onnx", tmp_path / "nope", "--prompt", "x"], "missing"),
        "argparse": (["export", "--model", tiny_dir, "--out", out], "--onnx"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_dir):
    path = tmp_path_factory.mktemp("q") / "tiny-int8"
    assert (
        main(["quantize", "--model", str(tiny_dir), "--out", str(path), "--bits", "8", "--group-size", "32"])
        == 0
    )
    return path


@pytest.mark.parametrize(
    "case",
    ["bits", "group", "export bits", "missing weights", "missing dir", "quantized", "quantized export", "exists",
     "gptq calib", "calib file", "key", "override", "onnx dir", "argparse"],
)  # fmt: skip
def test_quant_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, tiny_dir, quantized_dir, case):
    argv, pattern = _bad_inputs(tmp_path, tiny_dir, quantized_dir)[case]
    before = sorted(p.name for p in quantized_dir.iterdir())
    with pytest.raises(SystemExit) if case == "argparse" else _no_raise() as exc:
        code, _, err = run(capsys, *argv)
    if case == "argparse":
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ds-quant: error: "), err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert sorted(p.name for p in quantized_dir.iterdir()) == before  # an existing target untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_quant_cli_force_replaces(tmp_path, capsys, tiny_dir):
    out = tmp_path / "o"
    assert run(capsys, "export", "--onnx", "--model", tiny_dir, "--out", out, "--bits", 8)[0] == 0
    assert json.loads((out / "provenance.json").read_text())["export"]["bits"] == 8
    assert run(capsys, "export", "--onnx", "--model", tiny_dir, "--out", out, "--bits", 4, "--force")[0] == 0
    assert json.loads((out / "provenance.json").read_text())["export"]["bits"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp or old directories left behind


def test_quant_cli_console_script_help():
    r = subprocess.run(
        [sys.executable, "-m", "ds_quant", "export", "--help"], capture_output=True, text=True, check=True
    )
    assert "--accuracy-level" in r.stdout and "(default: 4)" in r.stdout
