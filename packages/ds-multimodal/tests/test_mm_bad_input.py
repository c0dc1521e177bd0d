import subprocess
import sys

import pytest
import torch

from ds_multimodal import DsMultimodalError, MultimodalAligner


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"image": torch.rand(2, 1, 8, 8)}, r"image: expected 16x16 pixels"),
        ({"image": torch.rand(2, 3, 16, 16)}, r"image: expected 1 \(greyscale\) channel, got 3"),
        ({"image": torch.rand(16)}, r"image: expected shape"),
        ({"video": torch.rand(2, 0, 1, 16, 16)}, r"video: empty video"),
        ({"video": torch.rand(2, 4, 1, 12, 12)}, r"video: expected 16x16"),
        ({"audio": torch.zeros(2, 16000)}, r"audio: clip 0 is silent"),
        ({"audio": torch.rand(2, 16000), "sample_rate": 22050}, r"sample_rate: expected 16000 Hz.*got 22050"),
        ({"audio": torch.rand(2, 100)}, r"audio: expected at least 400 samples"),
        ({"text": []}, r"text: expected at least one string"),
        ({"text": "a string"}, r"text: expected a list of strings"),
        ({}, r"embed: give at least one"),
    ],
)
def test_bad_inputs_name_the_argument(tiny_encoder_config, kwargs, pattern):
    from ds_multimodal import AlignerConfig

    model = MultimodalAligner(AlignerConfig(encoder=tiny_encoder_config, audio=True))
    with pytest.raises(DsMultimodalError, match=pattern):
        model.embed(**kwargs)


def test_load_missing_or_corrupt_directory(tmp_path, tiny_encoder_config):
    from ds_multimodal import AlignerConfig

    with pytest.raises(DsMultimodalError, match=r"config\.yaml: file not found"):
        MultimodalAligner.from_pretrained(tmp_path)
    MultimodalAligner(AlignerConfig(encoder=tiny_encoder_config, audio=False)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DsMultimodalError, match=r"model\.safetensors: cannot load"):
        MultimodalAligner.from_pretrained(tmp_path)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from ds_multimodal.cli import main

    assert main(["train", "--out", str(tmp_path / "m"), "epochs=0"]) == 2
    assert "ds-multimodal: error: epochs: expected a positive integer" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "m"), "colour=red"]) == 2
    assert "colour: unknown field" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    assert main(["train", "--out", str(tmp_path / "m"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: invalid YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: None)" in capsys.readouterr().out  # --help shows defaults
    # the installed entry point: one line on stderr, exit 2, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "ds_multimodal.cli", "eval", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "config.yaml: file not found" in r.stderr
