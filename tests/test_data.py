"""Data pipeline: bundled tokenizer and sample, readers, splits, token cache, window sampler, bad input."""

import gzip
import json
import lzma

import numpy as np
import pytest

from memoryformer import data
from memoryformer.config import MemoryFormerError

DOCS = ["The quick brown fox jumps over the lazy dog.", "A second document, with other words in it!"]


def _ids(text):
    return data.encode(text)


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": "x", "text": d}) + "\n")
    return path


def test_bundled_tokenizer_matches_gpt_neox():
    tok = data.get_tokenizer()
    assert tok.encode("Hello world!").ids == [12092, 1533, 2]
    assert tok.get_vocab_size() == 50277
    assert tok.id_to_token(data.EOT_ID) == "<|endoftext|>"
    assert data.decode(_ids("Hello world!")) == "Hello world!"


def test_bundled_sample_is_small_and_split_by_book():
    total = sum(p.stat().st_size for p in data.ASSETS.iterdir() if p.is_file())
    assert total < 6.5e6
    ids = {}
    for split, path in data.SAMPLE_FILES.items():
        with lzma.open(path, "rt", encoding="utf-8") as f:
            ids[split] = {json.loads(line)["id"] for line in f}
    assert ids["train"] and ids["val"] and not ids["train"] & ids["val"]


@pytest.mark.parametrize("suffix,opener", [(".jsonl", open), (".jsonl.xz", lzma.open), (".jsonl.gz", gzip.open)])
def test_jsonl_reader_puts_eot_after_every_document(tmp_path, suffix, opener):
    f = write_jsonl(tmp_path / f"d{suffix}", DOCS, opener)
    toks = data.load_tokens(str(f), "train", val_data=str(f), cache_dir=tmp_path / "c")
    want = _ids(DOCS[0]) + [0] + _ids(DOCS[1]) + [0]
    assert toks.dtype == np.uint16 and toks.tolist() == want


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    toks = data.load_tokens(str(tmp_path / "a.txt"), "train", val_data=str(tmp_path / "a.txt"), cache_dir=tmp_path / "c")
    assert toks.tolist() == _ids("line one\nline two\n") + [0]


def test_folder_honours_train_val_split_and_skips_test(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "c.train.00.jsonl", [DOCS[0]])
    write_jsonl(d / "c.train.01.jsonl", [DOCS[1]])
    write_jsonl(d / "c.val.jsonl", ["validation text only"])
    write_jsonl(d / "c.test.jsonl", ["test text"])
    (d / "SHA256SUMS").write_text("ignored")
    tr = data.load_tokens(str(d), "train", cache_dir=tmp_path / "c")
    va = data.load_tokens(str(d), "val", cache_dir=tmp_path / "c")
    assert tr.tolist() == _ids(DOCS[0]) + [0] + _ids(DOCS[1]) + [0]
    assert va.tolist() == _ids("validation text only") + [0]


def test_single_file_holds_out_a_tail_at_a_document_boundary(tmp_path):
    docs = [f"Document number {i} says something about topic {i % 7}." for i in range(200)]
    f = write_jsonl(tmp_path / "one.jsonl", docs)
    kw = dict(cache_dir=tmp_path / "c", val_fraction=0.1)
    tr, va = data.load_tokens(str(f), "train", **kw), data.load_tokens(str(f), "val", **kw)
    full = data.load_tokens(str(f), "train", val_data=str(f), cache_dir=tmp_path / "c")
    assert tr.tolist() + va.tolist() == full.tolist()
    assert 0.05 * len(full) < len(va) < 0.15 * len(full)
    assert tr[-1] == data.EOT_ID  # val starts with a whole document


def test_cache_is_reused_and_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", DOCS)
    first = data.load_tokens(str(f), "train", val_data=str(f), cache_dir=tmp_path / "c").tolist()
    real = data._tokenize_to

    def fail(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data, "_tokenize_to", fail)
    assert data.load_tokens(str(f), "train", val_data=str(f), cache_dir=tmp_path / "c").tolist() == first
    write_jsonl(f, DOCS + ["one more document"])
    monkeypatch.setattr(data, "_tokenize_to", real)
    again = data.load_tokens(str(f), "train", val_data=str(f), cache_dir=tmp_path / "c").tolist()
    assert again[: len(first)] == first and len(again) > len(first)
    assert not list((tmp_path / "c").glob(".*tmp"))  # no temporary files left behind


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORYFORMER_CACHE", str(tmp_path / "envcache"))
    f = write_jsonl(tmp_path / "d.jsonl", DOCS)
    data.load_tokens(str(f), "train", val_data=str(f))
    assert list((tmp_path / "envcache").glob("tokens-*.bin"))


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("missing.jsonl", None, "no such file"),
        ("empty.jsonl", b"", "no text found"),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
        ("corrupt.jsonl.xz", b"this is not xz data at all", "corrupt compressed file"),
        ("badjson.jsonl", b'{"text": "ok"}\n{"text": broken\n', r"badjson.jsonl:2: not valid JSON"),
        ("notext.jsonl", b'{"body": "no text key"}\n', 'string "text" field'),
        ("data.csv", b"a,b\n", "unsupported file type"),
    ],
)
def test_bad_input_names_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MemoryFormerError, match=match) as e:
        data.load_tokens(str(path), "train", val_data=str(path), cache_dir=tmp_path / "c")
    assert name in str(e.value)
    cache = tmp_path / "c"
    assert not cache.exists() or not list(cache.glob("tokens-*"))  # nothing half-written is left to be reused


def test_truncated_xz_is_reported(tmp_path):
    good = write_jsonl(tmp_path / "g.jsonl.xz", DOCS * 50, lzma.open).read_bytes()
    (tmp_path / "t.jsonl.xz").write_bytes(good[: len(good) // 2])
    with pytest.raises(MemoryFormerError, match="t.jsonl.xz"):
        data.load_tokens(str(tmp_path / "t.jsonl.xz"), "train", cache_dir=tmp_path / "c")


def test_empty_folder_and_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemoryFormerError, match="folder holds no"):
        data.load_tokens(str(tmp_path / "empty"), "train", cache_dir=tmp_path / "c")
    with pytest.raises(MemoryFormerError, match="matches no"):
        data.load_tokens(str(tmp_path / "*.jsonl"), "train", cache_dir=tmp_path / "c")


def test_window_sampler_state_restores_the_data_position():
    a = data.WindowSampler(10_000, 65, seed=3)
    a.next(8)
    state = json.loads(json.dumps(a.state_dict()))  # survives the JSON checkpoint file
    want = [a.next(8) for _ in range(3)]
    b = data.WindowSampler(10_000, 65, seed=99)
    b.load_state_dict(state)
    got = [b.next(8) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(want, got))
    assert all(((x >= 0) & (x <= 10_000 - 65)).all() for x in want)
    with pytest.raises(MemoryFormerError, match="same --data"):
        data.WindowSampler(5_000, 65, seed=0).load_state_dict(state)


def test_windows_and_eval_starts():
    toks = np.arange(1000, dtype=np.uint16)
    w = data.windows(toks, np.array([0, 10]), 5)
    assert w.tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    s = data.eval_starts(1000, 64, 10_000)  # everything fits: consecutive windows
    assert s.tolist() == [i * 64 for i in range(15)]
    s = data.eval_starts(100_000, 64, 640)  # spread out, non-overlapping, in range
    assert len(s) == 10 and (np.diff(s) >= 64).all() and s[-1] + 65 <= 100_000
    with pytest.raises(MemoryFormerError):
        data.eval_starts(10, 64, 640)


def test_hugging_face_source_through_a_stand_in_datasets_module(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeDataset(list):
        column_names = ["text"]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if split == "validation":
            raise ValueError("Unknown split")  # the reader falls back to other names for validation
        return FakeDataset([{"text": f"{split} document {i}"} for i in range(3)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    tr = data.load_tokens("hf:someone/corpus:en", "train", cache_dir=tmp_path)
    va = data.load_tokens("hf:someone/corpus:en", "val", cache_dir=tmp_path)
    assert tr.tolist() == sum((_ids(f"train document {i}") + [0] for i in range(3)), [])
    assert va.tolist()[: len(_ids("valid document 0"))] == _ids("valid document 0")
    assert ("someone/corpus", "en", "train") in calls and ("someone/corpus", "en", "valid") in calls


def test_hugging_face_source_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MemoryFormerError, match=r"memoryformer\[hf\]"):
        data.load_tokens("hf:someone/corpus", "train", cache_dir=tmp_path)
