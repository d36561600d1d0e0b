"""Token shards and the batch loader: headers, fingerprints, corruption, parallel == serial."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scratchlm.data import (
    BatchLoader,
    ShardError,
    open_shard,
    prepare_dataset,
    read_shard_header,
    tokenize_dataset,
    write_shard,
)
from scratchlm.data.shards import encode_documents
from scratchlm.io import FormatError
from scratchlm.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def shakespeare_ds(tmp_path_factory):
    ds, _ = prepare_dataset("shakespeare", tmp_path_factory.mktemp("ds") / "shakespeare")
    return ds


def test_tokenize_dataset_parallel_equals_serial(tmp_path, shakespeare_ds, shakespeare_bpe):
    tok_path = shakespeare_bpe.save(tmp_path / "bpe.json")
    summary = tokenize_dataset(shakespeare_ds, tok_path, tmp_path / "shards", num_workers=2)
    train = open_shard(tmp_path / "shards" / "train.bin", shakespeare_bpe)
    expected = shakespeare_bpe.encode_ordinary_reference(shakespeare_ds.text("train"))
    assert train.dtype == np.dtype("<u2")
    assert np.array_equal(np.asarray(train), expected)
    assert summary["splits"]["train"]["tokens"] == len(expected)
    assert load_tokenizer(tmp_path / "shards" / "tokenizer.json").fingerprint == shakespeare_bpe.fingerprint
    assert (
        json.loads((tmp_path / "shards" / "shards.json").read_text())["tokenizer_fingerprint"]
        == shakespeare_bpe.fingerprint
    )


def test_documents_are_joined_with_endoftext(shakespeare_bpe):
    docs = ["first document\nwith lines", "second", "third one"]
    ids = encode_documents(docs, shakespeare_bpe)
    eot = shakespeare_bpe.eot_token
    assert list(ids).count(eot) == 2
    assert shakespeare_bpe.decode(ids) == "<|endoftext|>".join(docs)


def test_shard_from_another_tokenizer_is_refused(tmp_path, shakespeare_bpe, gpt2):
    path = write_shard(tmp_path / "a.bin", np.arange(100), shakespeare_bpe)
    with pytest.raises(ShardError) as err:
        open_shard(path, gpt2)
    assert shakespeare_bpe.fingerprint[:16] in str(err.value) and gpt2.fingerprint[:16] in str(err.value)
    assert len(open_shard(path, shakespeare_bpe)) == 100


def test_truncated_and_corrupt_shards(tmp_path, shakespeare_bpe):
    path = write_shard(tmp_path / "t.bin", np.arange(1000), shakespeare_bpe)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ShardError, match=r"header says 1000 ids .* truncated"):
        read_shard_header(path)
    path.write_bytes(data[:20])
    with pytest.raises(ShardError, match="too short"):
        read_shard_header(path)
    path.write_bytes(b"NOTASHRD" + data[8:])
    with pytest.raises(ShardError, match="not a scratchlm token shard"):
        read_shard_header(path)


def test_uint32_shards_for_large_vocabularies(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    tok = CharTokenizer(chars)
    assert tok.vocab_size > 65_536
    ids = np.array([0, 65_535, 65_536, tok.vocab_size - 1])
    path = write_shard(tmp_path / "big.bin", ids, tok)
    assert read_shard_header(path)["itemsize"] == 4
    assert np.array_equal(open_shard(path, tok), ids)
    with pytest.raises(ValueError, match="outside"):
        write_shard(tmp_path / "bad.bin", np.array([tok.vocab_size]), tok)
    assert not (tmp_path / "bad.bin").exists()


def test_corrupt_tokenizer_files(tmp_path, shakespeare_bpe):
    path = shakespeare_bpe.save(tmp_path / "tok.json")
    raw = path.read_text()
    path.write_text(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load_tokenizer(path)
    obj = json.loads(raw)
    path.write_text(json.dumps({**obj, "version": 99}))
    with pytest.raises(FormatError, match="version 99 is not supported"):
        load_tokenizer(path)
    path.write_text(json.dumps({**obj, "format": "something.else"}))
    with pytest.raises(FormatError, match="expected format 'scratchlm.tokenizer'"):
        load_tokenizer(path)
    broken = dict(obj)
    broken["vocab"] = obj["vocab"][:300]  # merges now point past the vocabulary
    path.write_text(json.dumps(broken))
    with pytest.raises(FormatError):
        load_tokenizer(path)


def test_batch_loader_shifts_targets_by_one(tmp_path):
    tok = ByteTokenizer()
    ids = np.arange(5000) % 256
    path = write_shard(tmp_path / "s.bin", ids, tok)
    loader = BatchLoader(path, block_size=32, batch_size=8, tokenizer=tok, seed=0)
    x, y = loader.get_batch()
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.long  # what nn.Embedding and cross-entropy take
    assert (y[:, :-1] == x[:, 1:]).all()
    assert ((x + 1) % 256 == y).all()  # y is the token after x in the stream
    x2, _ = BatchLoader(path, block_size=32, batch_size=8, seed=0).get_batch()
    assert (x == x2).all()  # seeded
    with pytest.raises(ValueError, match="fewer than block_size"):
        BatchLoader(path, block_size=5000, batch_size=1)


def test_char_tokenizer_worker_processes_equal_serial(tmp_path, shakespeare_ds):
    tok = CharTokenizer.train(shakespeare_ds.text("train"))
    path = tok.save(tmp_path / "char.json")
    text = shakespeare_ds.text("train")
    parallel = encode_documents([text, text[:1000]], tok, path, num_workers=2, piece_chars=100_000)
    serial = encode_documents([text, text[:1000]], tok, None, num_workers=1)
    assert np.array_equal(parallel, serial)
    assert np.array_equal(serial[: len(text)], tok.encode(text))
