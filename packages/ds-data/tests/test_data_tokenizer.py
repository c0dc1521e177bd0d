import os

import pytest
from tokenizers import Tokenizer

import ds_data


def test_byte_level_bpe_round_trips_any_text(small_tokenizer):
    tok = small_tokenizer
    assert tok.get_vocab_size() == 600
    assert tok.token_to_id(ds_data.EOS) == 0
    for text in ["The if statement", "naïve café — 😀🇺🇸\r\nline two", "日本語のテキスト", "\x00\tx"]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    # BPE merges learned from English: common words are single tokens or close to it.
    assert len(tok.encode("the statement").ids) <= 4


def test_written_json_loads_and_matches(small_tokenizer, tmp_path):
    out = tmp_path / "model_dir"
    tok = ds_data.train_tokenizer(["hello world"] * 50 + ["other words here"] * 20, 300, str(out))
    path = out / "tokenizer.json"
    assert path.is_file()
    loaded = Tokenizer.from_file(str(path))
    assert loaded.encode("hello world").ids == tok.encode("hello world").ids
    assert ds_data.load_tokenizer(str(out)).to_str() == tok.to_str()
    assert [f for f in os.listdir(out) if f.startswith(".tmp")] == []


def test_training_is_deterministic(builtin_corpus, tmp_path):
    texts = list(builtin_corpus["validation"]["text"])
    a = ds_data.train_tokenizer(texts, 400, str(tmp_path / "a.json"))
    b = ds_data.train_tokenizer(texts, 400, str(tmp_path / "b.json"))
    assert a.to_str() == b.to_str()


@pytest.mark.parametrize("bad", [10, 257, "1000", 3.5])
def test_bad_vocab_size(bad):
    with pytest.raises(ds_data.DsDataError, match="vocab_size"):
        ds_data.train_tokenizer(["x"], bad, None)


def test_bad_inputs(tmp_path):
    with pytest.raises(ds_data.DsDataError, match="texts_or_dataset"):
        ds_data.train_tokenizer("just a string", 300, None)
    with pytest.raises(ds_data.DsDataError, match=r"texts_or_dataset\[1\]"):
        ds_data.train_tokenizer(["ok", 3], 300, None)
    with pytest.raises(ds_data.DsDataError, match="tokenizer file not found"):
        ds_data.load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ds_data.DsDataError, match="not a tokenizers JSON"):
        ds_data.load_tokenizer(str(tmp_path))
