"""Shared fixtures: tiny model configs and models, a toy corpus, hand-made benchmark files, an isolated token cache.

Nothing here (or in any test) reads files outside the repository: tests that want the full benchmark files take them
from $MEMORYFORMER_EVAL_DIR and are skipped without it.
"""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import pytest
from helpers import FIXTURES, tiny_config, tiny_model

# No test reaches the network: the Hugging Face libraries read only local files and caches.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_token_cache(tmp_path_factory):
    """Every test tokenizes into a session folder, never into the user's ~/.cache/memoryformer."""
    old = os.environ.get("MEMORYFORMER_CACHE")
    os.environ["MEMORYFORMER_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    if old is None:
        os.environ.pop("MEMORYFORMER_CACHE", None)
    else:
        os.environ["MEMORYFORMER_CACHE"] = old


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small train/val folder cut from the bundled sample's validation books (about 12 k + 3 k tokens)."""
    from memoryformer import data as data_mod

    d = tmp_path_factory.mktemp("corpus")
    with lzma.open(data_mod.SAMPLE_FILES["val"], "rt", encoding="utf-8") as f:
        books = [json.loads(line)["text"] for line in f]
    with open(d / "toy.train.jsonl", "w", encoding="utf-8") as f:
        for b in books[:2]:
            f.write(json.dumps({"text": b[:25_000]}) + "\n")
    with open(d / "toy.val.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": books[2][:12_000]}) + "\n")
    return d


@pytest.fixture(scope="session")
def bench() -> Path:
    """Hand-made benchmark files: three examples per task, in lm-eval's field layout (tests/fixtures/eval)."""
    return FIXTURES / "eval"


@pytest.fixture(scope="session")
def full_bench() -> Path:
    """The full benchmark files from $MEMORYFORMER_EVAL_DIR; tests asking for them are skipped without it."""
    env = os.environ.get("MEMORYFORMER_EVAL_DIR")
    if not env or not Path(env).is_dir():
        pytest.skip("set MEMORYFORMER_EVAL_DIR to a folder with the full benchmark files to run this test")
    return Path(env)


@pytest.fixture
def vocab_model():
    """Smallest models with the real vocabulary (benchmarks are tokenized with it): vocab_model(arch, **kw)."""

    def make(arch: str = "memoryformer", **kw):
        base = dict(max_seq_len=64, tau=8) if arch == "memoryformer" else dict(max_seq_len=64)
        return tiny_model(arch, **{**base, **kw})

    return make
