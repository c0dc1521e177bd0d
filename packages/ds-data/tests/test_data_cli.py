import json
import os
import subprocess
import sys

import datasets
import pytest

import ds_data


def test_sample_convert_round_trip(run_cli, tmp_path):
    code, out, _ = run_cli("sample", "--n", "36", "--seed", "4", "--out", tmp_path / "s.jsonl")
    assert code == 0 and "36" in out
    for ext in (".parquet", ".json"):
        assert run_cli("convert", tmp_path / "s.jsonl", "--out", tmp_path / f"s{ext}")[0] == 0
        assert run_cli("convert", tmp_path / f"s{ext}", "--out", tmp_path / f"back{ext}.jsonl")[0] == 0
        assert (tmp_path / f"back{ext}.jsonl").read_bytes() == (tmp_path / "s.jsonl").read_bytes()
    assert run_cli("validate", tmp_path / "s.parquet", tmp_path / "s.json")[0] == 2  # same ids twice
    assert run_cli("validate", tmp_path / "s.parquet")[0] == 0
    code, out, _ = run_cli("sample", "--n", "2")
    assert [json.loads(x)["domain"] for x in out.splitlines()] == ["healthcare", "finance"]


def test_tokenizer_train_and_pack(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_DATA_CACHE", str(tmp_path / "cache"))
    code, out, _ = run_cli("tokenizer", "train", "--vocab-size", "512", "--out", tmp_path / "tok")
    assert code == 0 and (tmp_path / "tok" / "tokenizer.json").is_file()
    tok = ds_data.load_tokenizer(str(tmp_path / "tok"))
    assert tok.get_vocab_size() == 512
    code, out, _ = run_cli(
        "pack", "--tokenizer", tmp_path / "tok", "--seq-len", "128", "--out", tmp_path / "packed"
    )
    assert code == 0
    info = json.loads(out)
    train = datasets.load_from_disk(str(tmp_path / "packed" / "train"))
    assert train.num_rows == info["train"]["rows"] > 100
    assert len(train[0]["input_ids"]) == 128
    assert info["train"]["fingerprint"] == ds_data.fingerprint(train)
    assert info["train"]["source_fingerprint"] == ds_data.fingerprint(ds_data.load_corpus()["train"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["tokenizer", "train", "--vocab-size", "10"], "vocab_size"),
        (["tokenizer", "train", "missing.txt"], "missing.txt: file not found"),
        (["stats", "missing.jsonl"], "missing.jsonl: file.missing"),
        (["convert", "bad.jsonl", "--out", "x.jsonl"], "bad.jsonl:1: $: json.malformed"),
        (["sample", "--n", "3", "--out", "x.csv"], "--out: x.csv"),
        (["sample", "--n", "0"], "--n"),
        (["labelstudio", "import", "missing.json", "--out", "x.jsonl"], "missing.json: file not found"),
        (["pack", "--tokenizer", "nope", "--out", "p"], "tokenizer file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_cli, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    code, _out, err = run_cli(*argv)
    assert code == 2
    assert err.startswith("ds-data: error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_help_shows_defaults():
    env = dict(os.environ, COLUMNS="200")  # argparse wraps to the terminal width
    proc = subprocess.run(
        [sys.executable, "-m", "ds_data.cli", "tokenizer", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert "--vocab-size" in proc.stdout and "(default: 8192)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ds_data.cli", "validate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "required" in proc.stderr


def test_public_api_names_resolve_and_validate_starts_light():
    for name in ds_data.__all__:
        assert getattr(ds_data, name) is not None
    # `ds-data validate` must not pay for importing datasets/tokenizers (a second or more at start-up).
    code = "import sys, ds_data, ds_data.cli, ds_data.validate; print('datasets' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
