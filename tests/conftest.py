"""Shared fixtures: the files in ../shared/data (read in place, never copied into the project).
Starting processes (two-rank runs, children killed on purpose) is ``tests/processes.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def _offline_sources(tmp_path_factory):
    """Named sources resolve to ../shared/data through the offline-mirror mechanism users have."""
    os.environ["SCRATCHLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    if SHARED_DATA.is_dir():
        os.environ["SCRATCHLM_LOCAL_DATA"] = str(SHARED_DATA)
    yield


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    from scratchlm.downloads import fetch

    return fetch("shakespeare").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def names() -> list[str]:
    from scratchlm.downloads import fetch

    return fetch("names").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def gpt2():
    from scratchlm.tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def shakespeare_bpe(shakespeare_text):
    from scratchlm.tokenizers import train_bpe

    return train_bpe(shakespeare_text[:500_000], 1024, "gpt2", ["<|endoftext|>"])


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory):
    """Character-level tinyshakespeare shards (65 characters, no special token): the tiny training runs'
    data. Tests only read them; each run writes into its own out_dir."""
    from scratchlm.data import prepare_dataset, tokenize_dataset
    from scratchlm.tokenizers import CharTokenizer

    root = tmp_path_factory.mktemp("char")
    ds, _ = prepare_dataset("shakespeare", root / "shakespeare")
    path = CharTokenizer.train(ds.text("train")).save(root / "char.json")
    return tokenize_dataset(ds, path, root / "char")["path"]


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``) each worker computes with one thread: two workers of two
    threads each on a 2-core machine make every small op wait for a descheduled thread (tiny
    training steps ran 10-30x slower)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the processes the tests start
        os.environ.setdefault("SCRATCHLM_THREADS", "1")
