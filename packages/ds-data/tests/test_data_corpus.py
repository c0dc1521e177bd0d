import json

import pytest

import ds_data
from ds_data.corpus import split_documents


def test_builtin_corpus_is_real_english_and_split(builtin_corpus):
    train, val = builtin_corpus["train"], builtin_corpus["validation"]
    assert train.column_names == ["text"] and val.column_names == ["text"]
    assert train.num_rows > 1000 and val.num_rows > 20
    text = " ".join(train["text"])
    assert len(text) > 300_000
    # Real prose: common English function words are frequent.
    words = text.lower().split()
    for w in ("the", "of", "is", "statement"):
        assert words.count(w) > 100, w
    assert not set(train["text"]) & set(val["text"])


def test_split_is_deterministic_and_order_independent():
    docs = [f"document number {i}" for i in range(500)]
    a = split_documents(docs, 0.1)
    b = split_documents(list(reversed(docs)), 0.1)
    assert sorted(a[0]) == sorted(b[0]) and sorted(a[1]) == sorted(b[1])
    assert 20 < len(a[1]) < 80
    again = ds_data.load_corpus()
    assert list(again["validation"]["text"]) == list(ds_data.load_corpus()["validation"]["text"])


def test_tiny_corpus_keeps_both_splits_nonempty(tmp_path):
    p = tmp_path / "two.txt"
    p.write_text("first paragraph\n\nsecond paragraph\n")
    dd = ds_data.load_corpus([str(p)])
    assert dd["train"].num_rows == 1 and dd["validation"].num_rows == 1


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("alpha one\r\n\r\nbeta two\n\n\n gamma three\n")
    jl = tmp_path / "b.jsonl"
    jl.write_text(
        json.dumps({"id": "x", "text": "delta 😀 four"}) + "\n\n" + json.dumps({"text": "eps"}) + "\n"
    )
    dd = ds_data.load_corpus([str(txt), str(jl)], val_fraction=0.5)
    allt = sorted(list(dd["train"]["text"]) + list(dd["validation"]["text"]))
    assert allt == sorted(["alpha one", "beta two", " gamma three", "delta 😀 four", "eps"])


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.txt", None, "file not found"),
        ("bad.jsonl", "{not json\n", r"bad.jsonl:1: malformed JSON"),
        ("notext.jsonl", '{"id": 1}\n', r"notext.jsonl:1: text"),
        ("data.csv", "a,b\n", "unsupported corpus file"),
        ("empty.txt", "\n\n", "corpus is empty"),
    ],
)
def test_bad_corpus_files(tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(ds_data.DsDataError, match=match):
        ds_data.load_corpus([str(p)])


def test_bad_val_fraction():
    with pytest.raises(ds_data.DsDataError, match="val_fraction"):
        ds_data.load_corpus(val_fraction=1.5)
