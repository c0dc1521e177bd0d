import os
import subprocess
import sys

import pytest

from ds_models.cli import main


def test_info_prints_parameters_and_memory_table(capsys):
    assert main(["info", "ds-7b", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "ds-7b: 6.91B parameters (6,910,365,696)" in out
    for line in ("fp32", "bf16", "int8", "int4"):
        assert line in out
    bf16 = next(line for line in out.splitlines() if line.strip().startswith("bf16"))
    assert "12.87 GiB" in bf16 and "480.00 KiB" in bf16 and "1.88 GiB" in bf16  # weights, KV/token, KV@4096


def test_info_reads_a_model_directory(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "119.36K parameters" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(capsys, tmp_path):
    assert main(["info", "ds-huge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ds-models: error: ds-huge: not a registry name")
    assert main(["info", "ds-tiny", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["info"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the following arguments are required: name" in err


def test_generate_streams_text(tiny_model, tokenizer, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "the quick fox", "--max-new-tokens", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick fox") and len(out) > len("the quick fox\n")
    assert main([*args, "--temperature", "0.8", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--temperature", "0.8", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_generate_without_tokenizer_is_bad_input(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    assert "tokenizer.json: missing" in capsys.readouterr().err


def test_console_entry_point_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run(
        [sys.executable, "-m", "ds_models", "info", "ds-tiny"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and "ds-tiny" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ds_models", "generate", "--model", str(tmp_path), "--prompt", "x"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main(["import-hf", "--help"])
    assert e.value.code == 0
    assert "(default: keep)" in " ".join(capsys.readouterr().out.split())
