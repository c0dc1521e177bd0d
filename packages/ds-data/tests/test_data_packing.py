import datasets
import pytest

import ds_data


def test_pack_fixed_length_with_eos_between_documents(small_tokenizer, tmp_path):
    tok = small_tokenizer
    eos = tok.token_to_id(ds_data.EOS)
    docs = ["first document here.", "second one, a bit longer than the first.", "third."] * 40
    ds = datasets.Dataset.from_dict({"text": docs})
    packed = ds_data.pack(ds, tok, 16, cache_dir=str(tmp_path))
    assert packed.column_names == ["input_ids"]
    rows = list(packed["input_ids"])
    assert all(len(r) == 16 for r in rows)
    # The packed stream is exactly the documents' tokens, each followed by EOS, tail dropped.
    expected = []
    for d in docs:
        expected += [*tok.encode(d, add_special_tokens=False).ids, eos]
    flat = [t for r in rows for t in r]
    assert len(flat) == (len(expected) // 16) * 16
    assert flat == expected[: len(flat)]
    assert flat.count(eos) >= len(docs) - 2


def test_pack_is_deterministic_and_cached(builtin_corpus, small_tokenizer, tmp_path):
    val = builtin_corpus["validation"]
    a = ds_data.pack(val, small_tokenizer, 64, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("pack-*.arrow"))) == 1
    mtime = next(tmp_path.glob("pack-*.arrow")).stat().st_mtime_ns
    b = ds_data.pack(val, small_tokenizer, 64, cache_dir=str(tmp_path))
    assert next(tmp_path.glob("pack-*.arrow")).stat().st_mtime_ns == mtime  # loaded, not rewritten
    assert b.cache_files[0]["filename"] == a.cache_files[0]["filename"]
    assert ds_data.fingerprint(a) == ds_data.fingerprint(b)
    c = ds_data.pack(val, small_tokenizer, 32, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("pack-*.arrow"))) == 2 and c.num_rows > a.num_rows


def test_pack_multiprocess_matches_token_stream(builtin_corpus, small_tokenizer, tmp_path):
    train = builtin_corpus["train"].select(range(1500))
    one = ds_data.pack(train, small_tokenizer, 64, cache_dir=str(tmp_path / "one"))
    two = ds_data.pack(train, small_tokenizer, 64, num_proc=2, cache_dir=str(tmp_path / "two"))
    again = ds_data.pack(train, small_tokenizer, 64, num_proc=2, cache_dir=str(tmp_path / "again"))
    assert ds_data.fingerprint(two) == ds_data.fingerprint(again)
    # Only the dropped tail at the shard boundary may differ.
    assert abs(one.num_rows - two.num_rows) <= 1
    assert one[:5]["input_ids"] == two[:5]["input_ids"]


def test_fingerprint_is_content_hash(tmp_path):
    a = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(20000)]})
    a.to_parquet(str(tmp_path / "a.parquet"))
    b = datasets.Dataset.from_parquet(str(tmp_path / "a.parquet"), cache_dir=str(tmp_path / "c"))
    assert ds_data.fingerprint(a) == ds_data.fingerprint(b)
    changed = a.map(lambda r, i: {"text": r["text"] + ("!" if i == 19999 else "")}, with_indices=True)
    assert ds_data.fingerprint(changed) != ds_data.fingerprint(a)
    assert ds_data.fingerprint(a.select(range(10))) != ds_data.fingerprint(a.select(range(1, 11)))


def test_pack_bad_input(small_tokenizer):
    ds = datasets.Dataset.from_dict({"body": ["x"]})
    with pytest.raises(ds_data.DsDataError, match="no 'text' column"):
        ds_data.pack(ds, small_tokenizer, 8)
    with pytest.raises(ds_data.DsDataError, match="seq_len"):
        ds_data.pack(datasets.Dataset.from_dict({"text": ["x"]}), small_tokenizer, 0)
    with pytest.raises(ds_data.DsDataError, match="dataset"):
        ds_data.pack(["x"], small_tokenizer, 8)
