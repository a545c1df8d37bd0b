"""Tests of mdlm_sched.data on the real OWT sample and GPT-2 tokenizer in ../shared/data."""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import sys
from pathlib import Path

import numpy as np
import pytest

from mdlm_sched import data
from mdlm_sched.errors import DataError

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TINY = DATA / "owt_tiny.jsonl"
GPT2_EOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(str(DATA / "gpt2-tokenizer"))


@pytest.fixture(scope="module")
def owt_docs() -> list[str]:
    """The 300 documents of owt_tiny.jsonl, read independently of the module under test."""
    with open(TINY, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


# ----------------------------------------------------------------------------- tokenizer


def test_gpt2_tokenizer_basics(tokenizer):
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert len(tokenizer) == 50257
    assert data.mask_token_id(tokenizer) == 50257
    assert tokenizer.eos_token_id == GPT2_EOS


def test_tokenizer_hash_stable_and_sensitive(tokenizer):
    again = data.load_tokenizer(str(DATA / "gpt2-tokenizer"))
    digest = data.tokenizer_hash(tokenizer)
    assert len(digest) == 64 and digest == data.tokenizer_hash(again)
    again.add_tokens(["<newtok>"])
    assert data.tokenizer_hash(again) != digest
    assert data.mask_token_id(again) == 50258


def test_load_tokenizer_missing_folder(tmp_path):
    missing = tmp_path / "no-tokenizer"
    with pytest.raises(DataError, match="data.tokenizer=") as err:
        data.load_tokenizer(str(missing))
    assert str(missing) in str(err.value)


def test_load_tokenizer_folder_without_tokenizer(tmp_path):
    with pytest.raises(DataError, match="cannot load tokenizer"):
        data.load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- wrapping


def test_wrap_documents_exact_blocks():
    bos, eos = 100, 101
    # stream = 1 2 3 EOS 4 5 EOS 6 7 8 9 EOS -> chunks of 3: [1 2 3] [EOS 4 5] [EOS 6 7] [8 9 EOS], remainder none
    blocks = data.wrap_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=5, bos_id=bos, eos_id=eos)
    expected = [
        [bos, 1, 2, 3, eos],
        [bos, eos, 4, 5, eos],
        [bos, eos, 6, 7, eos],
        [bos, 8, 9, eos, eos],
    ]
    assert blocks.tolist() == expected
    assert blocks.dtype == np.uint16
    # one more token leaves a remainder of 1 that is dropped
    dropped = data.wrap_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], seq_len=5, bos_id=bos, eos_id=eos)
    assert dropped.tolist() == expected[:3] + [[bos, 8, 9, 10, eos]]


def test_wrap_documents_bos_eos_everywhere_and_dtypes():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=n) for n in rng.integers(1, 300, size=40)]
    blocks = data.wrap_documents(docs, seq_len=64, bos_id=50256, eos_id=50256)
    n_tokens = sum(len(d) + 1 for d in docs)
    assert blocks.shape == (n_tokens // 62, 64)
    assert (blocks[:, 0] == 50256).all() and (blocks[:, -1] == 50256).all()
    stream = np.concatenate([np.append(d, 50256) for d in docs])
    assert np.array_equal(blocks[:, 1:-1].ravel(), stream[: blocks.shape[0] * 62])
    big = data.wrap_documents([[70000, 1, 2]], seq_len=3, bos_id=0, eos_id=1)
    assert big.dtype == np.int32 and big.tolist() == [[0, 70000, 1], [0, 1, 1], [0, 2, 1], [0, 1, 1]]
    assert data.wrap_documents([], seq_len=8, bos_id=0, eos_id=1).shape == (0, 8)


@pytest.mark.parametrize("seq_len", [0, 2])
def test_wrap_documents_rejects_short_seq_len(seq_len):
    with pytest.raises(DataError, match="seq_len"):
        data.wrap_documents([[1, 2, 3]], seq_len=seq_len, bos_id=0, eos_id=0)


# ----------------------------------------------------------------------------- documents


def test_iter_documents_owt_tiny(owt_docs):
    docs = list(data.iter_documents(str(TINY)))
    assert len(docs) == 300 and docs == owt_docs
    assert list(data.iter_documents("owt_tiny.jsonl", root=DATA, max_docs=7)) == owt_docs[:7]


def test_iter_documents_xz_count():
    path = DATA / "owt_val.jsonl.xz"
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        n_lines = sum(1 for line in fh if line.strip())
    assert n_lines == 343
    assert sum(1 for _ in data.iter_documents(str(path))) == n_lines


def test_round_trip_gz_txt_parquet(tmp_path, owt_docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = owt_docs[:20] + [owt_docs[20] + "\n", "  \n" + owt_docs[21]]  # keep edge newlines exact
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "docs.txt").write_text(f"\n{data.EOT}\n".join(docs) + "\n", encoding="utf-8", newline="")
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "docs.parquet")
    for name in ("docs.jsonl.gz", "docs.txt", "docs.parquet"):
        assert list(data.iter_documents(name, root=tmp_path)) == docs, name


def test_txt_without_separator_is_one_document_and_empty_docs_are_skipped(tmp_path, owt_docs):
    (tmp_path / "one.txt").write_text(owt_docs[0], encoding="utf-8")
    assert list(data.iter_documents(str(tmp_path / "one.txt"))) == [owt_docs[0]]
    records = [{"text": owt_docs[0]}, {"text": ""}, {"text": "  \n"}, {"text": owt_docs[1]}]
    (tmp_path / "gaps.json").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")
    assert list(data.iter_documents(str(tmp_path / "gaps.json"))) == owt_docs[:2]
    assert list(data.iter_documents(str(tmp_path / "gaps.json"), max_docs=1)) == owt_docs[:1]


def test_glob_expands_in_sorted_order(tmp_path, owt_docs):
    for i, name in enumerate(["b.jsonl.xz", "a.jsonl.xz", "c.jsonl.xz"]):
        with lzma.open(tmp_path / name, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in owt_docs[10 * i : 10 * i + 10])
    docs = list(data.iter_documents("*.jsonl.xz", root=tmp_path))
    assert docs == owt_docs[10:20] + owt_docs[:10] + owt_docs[20:30]  # a, b, c
    data.check_source("*.jsonl.xz", root=tmp_path)


def test_bad_sources_raise_data_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for check in (lambda s: list(data.iter_documents(s)), data.check_source):
        with pytest.raises(DataError, match="nope.jsonl"):
            check(str(missing))
        with pytest.raises(DataError, match="matches no file"):
            check(str(tmp_path / "*.jsonl"))
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"table\.csv.*unsupported extension"):
        data.check_source(str(tmp_path / "table.csv"))
    with pytest.raises(DataError, match="is a folder"):
        data.check_source(str(tmp_path))
    data.check_source("hf:Skylion007/openwebtext#train")  # hub sources are checked when loaded


def test_missing_text_field(tmp_path, owt_docs):
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"text": owt_docs[0]}) + "\n" + json.dumps({"body": owt_docs[1]}) + "\n")
    with pytest.raises(DataError, match=r"fields\.jsonl:2 has no 'text' field"):
        list(data.iter_documents(str(path)))
    assert list(data.iter_documents(str(path), text_field="body", max_docs=0)) == []
    (tmp_path / "bad.jsonl").write_text('{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1 is not valid JSON"):
        list(data.iter_documents(str(tmp_path / "bad.jsonl")))


# ----------------------------------------------------------------------------- hub branch (local datasets)


def test_mdlm_split_on_real_docs(owt_docs):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([{"text": d} for d in owt_docs[:50]])
    train = data._mdlm_split(dataset, "train", val_docs=12)["text"]
    val = data._mdlm_split(dataset, "val", val_docs=12)["text"]
    assert val == owt_docs[38:50] and train == owt_docs[:38]
    assert not set(train) & set(val) and len(train) + len(val) == 50
    with pytest.raises(DataError, match="held out for val"):
        data._mdlm_split(dataset, "val", val_docs=50)


def test_hub_source_uses_mdlm_split(monkeypatch, owt_docs):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list([{"text": d, "id": i} for i, d in enumerate(owt_docs[:30])])
    calls = []

    def local_load_dataset(name, split, **kwargs):  # stands in for the network only; the split logic is real
        calls.append((name, split, kwargs))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", local_load_dataset)
    monkeypatch.setattr(data, "OWT_VAL_DOCS", 8)
    assert list(data.iter_documents("hf:Skylion007/openwebtext#val")) == owt_docs[22:30]
    assert list(data.iter_documents("hf:Skylion007/openwebtext#train", max_docs=5)) == owt_docs[:5]
    assert list(data.iter_documents("hf:Skylion007/openwebtext")) == owt_docs[:30]
    assert list(data.iter_documents("hf:other/set#validation")) == owt_docs[:30]
    assert list(data.iter_documents("hf:Skylion007/openwebtext@refs/convert/parquet#val")) == owt_docs[22:30]
    assert calls == ([("Skylion007/openwebtext", "train", {})] * 3 + [("other/set", "validation", {})]
                     + [("Skylion007/openwebtext", "train", {"revision": "refs/convert/parquet"})])
    with pytest.raises(DataError, match="'body' column"):
        list(data.iter_documents("hf:x#test", text_field="body"))


# ----------------------------------------------------------------------------- cached blocks


def test_tokenized_blocks_and_cache(tmp_path, tokenizer, owt_docs, caplog):
    caplog.set_level(logging.INFO, logger="mdlm_sched.data")
    cache = tmp_path / "cache"
    blocks = data.tokenized_blocks(str(TINY), tokenizer, seq_len=128, cache_dir=cache)
    assert blocks.shape == (384_855 // 126, 128)  # 384,555 tokens + 300 EOS (README counts)
    assert blocks.dtype == np.uint16 and isinstance(blocks, np.memmap) and not blocks.flags.writeable
    assert (blocks[:, 0] == GPT2_EOS).all() and (blocks[:, -1] == GPT2_EOS).all()
    text = tokenizer.decode(blocks[0, 1:-1].tolist())
    assert len(text) > 200 and owt_docs[0].startswith(text)
    assert "cache miss" in caplog.text and "300 documents, 384555 tokens" in caplog.text

    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temp file left behind
    mtime = files[0].stat().st_mtime_ns
    caplog.clear()
    again = data.tokenized_blocks("owt_tiny.jsonl", tokenizer, seq_len=128, cache_dir=cache, root=DATA)
    assert "cache hit" in caplog.text
    assert np.array_equal(again, blocks) and files[0].stat().st_mtime_ns == mtime

    shorter = data.tokenized_blocks(str(TINY), tokenizer, seq_len=64, cache_dir=cache, max_docs=40)
    fewer = data.tokenized_blocks(str(TINY), tokenizer, seq_len=128, cache_dir=cache, max_docs=40)
    assert shorter.shape[1] == 64 and fewer.shape[0] < blocks.shape[0]
    assert np.array_equal(fewer, blocks[: len(fewer)])  # same stream, cut earlier
    assert len(list(cache.iterdir())) == 3


def test_cache_follows_source_file_changes(tmp_path, tokenizer, owt_docs):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in owt_docs[:5]), encoding="utf-8")
    first = np.array(data.tokenized_blocks(str(source), tokenizer, seq_len=32, cache_dir=tmp_path / "c"))
    with open(source, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": owt_docs[5]}) + "\n")
    second = data.tokenized_blocks(str(source), tokenizer, seq_len=32, cache_dir=tmp_path / "c")
    assert len(second) > len(first) and len(list((tmp_path / "c").iterdir())) == 2


def test_source_shorter_than_one_block(tmp_path, tokenizer):
    source = tmp_path / "short.jsonl"
    source.write_text(json.dumps({"text": "Hello world"}) + "\n")
    with pytest.raises(DataError, match=r"short\.jsonl.*shorter than one block of 128 tokens.*data\.seq_len"):
        data.tokenized_blocks(str(source), tokenizer, seq_len=128, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_missing_optional_packages_name_the_install(tmp_path, monkeypatch, owt_docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": owt_docs[:3]}), tmp_path / "docs.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now fails as if not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'mdlm-sched\[parquet\]'"):
        list(data.iter_documents(str(tmp_path / "docs.parquet")))
    with pytest.raises(DataError, match=r"pip install 'mdlm-sched\[hub\]' or use local files"):
        list(data.iter_documents("hf:Skylion007/openwebtext#train"))
