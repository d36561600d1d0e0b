"""Data files under faults and odd input: nothing written is ever unreadable, no half file is taken
as valid, and every refusal names the file, what was expected and what to do.

The data half of the fault-injection suite (the training half: tests/train/test_faults.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.data import Dataset, prepare_dataset, tokenize_dataset
from scratchlm.data.shards import ShardError, open_shard
from scratchlm.io import FormatError, atomic_write, write_json
from scratchlm.tokenizers import (
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT,
    ByteTokenizer,
    load_tokenizer,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]

# Every code point str.splitlines() treats as a line boundary.
LINE_BREAKERS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


# --- defect 4: text with Unicode line separators round-trips -----------------------------------
def test_every_unicode_line_break_survives_prepare_and_load(tmp_path):
    docs = [f"doc {i} before{brk}after {brk}end" for i, brk in enumerate(LINE_BREAKERS * 3)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    ds, _ = prepare_dataset(str(src), tmp_path / "out", nfc=False)
    again = Dataset.load(tmp_path / "out")
    read = [d for split in ("train", "val", "test") for d in again.documents(split)]
    # The pipeline normalizes \r\n and \r to \n (counted in the manifest); every other breaker stays.
    expected = [d.replace("\r\n", "\n").replace("\r", "\n") for d in docs]
    assert sorted(read) == sorted(expected)
    assert any("\u2028" in d for d in read) and any("\x85" in d for d in read)


def test_one_document_per_line_splits_only_at_newlines(tmp_path):
    src = tmp_path / "lines.txt"
    src.write_text("first\u2028still first\nsecond\x85still second\nthird\n" * 10, encoding="utf-8")
    ds, _ = prepare_dataset(str(src), tmp_path / "out", documents="lines")
    docs = [d for split in ("train", "val", "test") for d in ds.documents(split)]
    assert len(docs) == 30  # duplicates are kept (grouped in one split), none split apart or merged
    assert all(d in {"first\u2028still first", "second\x85still second", "third"} for d in docs)


# --- defect 3: bits per byte does not count special tokens as text ----------------------------
def test_bits_per_byte_counts_special_tokens_as_zero_bytes():
    from scratchlm.eval.perplexity import evaluate_ids
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    tok = ByteTokenizer.train([""], [ENDOFTEXT])
    eot = tok.eot_token
    # Hand-counted: "ab" + EOT + "cd" + EOT + "e", predicted from the second token on, block 4:
    # one window of 4 targets = ids[1:5] = "b", EOT, "c", "d"  ->  3 bytes of text, not 3 + 13.
    ids = np.array(tok.encode("ab") + [eot] + tok.encode("cd") + [eot] + tok.encode("e"), dtype=np.int64)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, d_model=8, block_size=4))
    report = evaluate_ids(model, ids, tok, batch_size=1)
    assert report["tokens"] == 4
    assert report["bytes"] == 3
    assert report["bits_per_byte"] == pytest.approx(report["loss"] * 4 / math.log(2) / 3)
    assert tok.decode_bytes([eot]) == ENDOFTEXT.encode()  # decoding for display still spells it
    assert tok.decode_bytes([eot], skip_special=True) == b""


def test_cross_entropy_without_full_log_softmax_matches_reference():
    """Defect 13 (eval half): per-token NLL from F.cross_entropy equals the log_softmax reference."""
    from scratchlm.eval.perplexity import evaluate_ids
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    torch.manual_seed(0)
    tok = ByteTokenizer.train([""], [])
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, block_size=8, init_std=0.5)
    model = GPT(config).eval()
    ids = np.random.default_rng(0).integers(0, 256, size=8 * 5 + 1)
    report = evaluate_ids(model, ids, tok, batch_size=2)
    windows = torch.from_numpy(np.stack([ids[r * 8 : r * 8 + 9] for r in range(5)]).astype(np.int64))
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
        reference = -torch.log_softmax(logits.double(), -1).gather(-1, windows[:, 1:, None])[..., 0]
    assert report["loss"] == pytest.approx(reference.mean().item(), abs=1e-5)
    assert np.allclose(report["loss_by_position"], reference.mean(0).numpy(), atol=1e-5)


# --- defect 9: one default for special tokens; shards separate documents ------------------------
@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_every_trainer_adds_the_same_default_special_tokens(kind):
    texts = ["hello world", "another document"]
    tok = train_tokenizer(kind, texts, vocab_size=300 if kind == "bpe" else None)
    assert list(tok.special_tokens) == list(DEFAULT_SPECIAL_TOKENS)
    none = train_tokenizer(kind, texts, vocab_size=300 if kind == "bpe" else None, special_tokens=[])
    assert none.special_tokens == {}


def test_cli_trained_tokenizer_separates_documents_in_shards(tmp_path):
    from scratchlm.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} says hello"}) + "\n" for i in range(40)))
    prepare_dataset(str(src), tmp_path / "ds")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--dataset",
                str(tmp_path / "ds"),
                "--kind",
                "bpe",
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "bpe.json"),
            ]
        )
        == 0
    )
    tok = load_tokenizer(tmp_path / "bpe.json")
    assert tok.eot_token is not None
    summary = tokenize_dataset(tmp_path / "ds", tmp_path / "bpe.json", tmp_path / "shards")
    ids = np.asarray(open_shard(tmp_path / "shards" / "train.bin", tok))
    n_docs = Dataset.load(tmp_path / "ds").manifest["splits"]["train"]["documents"]
    assert int((ids == tok.eot_token).sum()) == n_docs - 1
    assert summary["splits"]["train"]["tokens"] == len(ids)


def test_tokenizer_without_separator_is_refused_for_multi_document_data(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40)))
    prepare_dataset(str(src), tmp_path / "ds")
    path = train_tokenizer("byte", [""], special_tokens=[]).save(tmp_path / "byte.json")
    with pytest.raises(ValueError, match=r"byte\.json has no <\|endoftext\|> token.*several documents"):
        tokenize_dataset(tmp_path / "ds", path, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


# --- defect 11: files keep the user's umask ------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"format": "x", "version": 1})
        with atomic_write(tmp_path / "b.bin") as f:
            f.write(b"data")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "keep.json"
    write_json(path, {"format": "x", "version": 1})
    path.chmod(0o640)
    write_json(path, {"format": "x", "version": 1, "more": True})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# --- kills while writing data: no half file is ever taken as valid; a rerun completes -------------
KILL_AT_NTH_OPERATION = r"""
import builtins, json, os, signal, sys
sys.path.insert(0, {repo!r})
from scratchlm.data import prepare_dataset, tokenize_dataset

kill_at, count = {n}, [0]

def counted(module, name, writes=lambda *a, **k: True):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        if writes(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)

# Every call that changes the file system or makes a change durable (os.open covers mkstemp and the
# directory fsyncs' opens; builtins.open counts only when it may write).
for name in ("mkdir", "open", "fchmod", "fsync", "rename", "replace", "unlink", "rmdir", "symlink"):
    counted(os, name)
counted(builtins, "open", lambda file, mode="r", *a, **k: any(c in mode for c in "wax+"))
{call}
print(json.dumps({{"operations": count[0]}}))
"""


def run_killed_at(tmp_path, call: str, n: int) -> subprocess.CompletedProcess:
    """Run ``call`` in a child that SIGKILLs itself at its n-th file-system operation (0: never)."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_NTH_OPERATION.format(repo=str(REPO), n=n, call=call))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)


def operations(tmp_path, call: str) -> int:
    dry = run_killed_at(tmp_path, call, 0)
    assert dry.returncode == 0, dry.stderr[-2000:]
    return json.loads(dry.stdout.strip().splitlines()[-1])["operations"]


@pytest.mark.slow  # ~50 s: one child process per operation
def test_kill_at_every_operation_of_data_prepare_then_rerun(tmp_path):
    """SIGKILL before each file-system operation of ``data prepare``: the folder is refused by name
    or holds the whole dataset — never a partial one — and a rerun completes."""
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"document {i}: " + "words " * (i % 7)}) + "\n" for i in range(60))
    )
    complete, _ = prepare_dataset(str(src), tmp_path / "reference")
    expected = {split: complete.documents(split) for split in ("train", "val", "test")}
    out = tmp_path / "ds"
    call = f"prepare_dataset({str(src)!r}, {str(out)!r})"
    n_ops = operations(tmp_path, call)
    assert n_ops >= 12  # four files, each: create, chmod, write, fsync, rename
    shutil.rmtree(out)
    outcomes = set()
    for n in range(1, n_ops + 1):
        assert run_killed_at(tmp_path, call, n).returncode == -signal.SIGKILL, n
        try:
            found = Dataset.load(out)
            assert {split: found.documents(split) for split in expected} == expected, n
            outcomes.add("whole")
        except (FileNotFoundError, FormatError) as e:
            assert re.search("no manifest.json|sha256 does not match|does not exist", str(e)), (n, e)
            outcomes.add("refused")
        prepare_dataset(str(src), out)  # the rerun
        assert {split: Dataset.load(out).documents(split) for split in expected} == expected, n
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], n  # no temporary file left
        shutil.rmtree(out)
    assert "refused" in outcomes  # (the manifest's rename is the last operation: a kill is always before it)


@pytest.mark.slow  # ~2 min: one child process per operation
def test_kill_at_every_operation_of_retokenizing_keeps_one_whole_set(tmp_path):
    """SIGKILL before each file-system operation of re-tokenizing a shards folder with another
    tokenizer: the folder then holds the old set whole, the new set whole, or no ``shards.json``
    (refused: "tokenizing did not finish") — never a mix — and a rerun completes."""
    from scratchlm.data import verify_shards

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} says something"}) + "\n" for i in range(60)))
    prepare_dataset(str(src), tmp_path / "ds")
    train_tokenizer("byte", [""]).save(tmp_path / "old.json")
    train_tokenizer("char", ["document 0123456789 says something"]).save(tmp_path / "new.json")
    old, new = load_tokenizer(tmp_path / "old.json"), load_tokenizer(tmp_path / "new.json")
    shards = tmp_path / "shards"
    call = f"tokenize_dataset({str(tmp_path / 'ds')!r}, {str(tmp_path / 'new.json')!r}, {str(shards)!r}, num_workers=1)"
    tokenize_dataset(tmp_path / "ds", tmp_path / "old.json", shards, num_workers=1)
    n_ops = operations(tmp_path, call)
    assert n_ops >= 20  # three shards, the tokenizer, shards.json; fsyncs of each and of the folder
    outcomes = set()
    for n in range(1, n_ops + 1):
        shutil.rmtree(shards)
        tokenize_dataset(tmp_path / "ds", tmp_path / "old.json", shards, num_workers=1)
        assert run_killed_at(tmp_path, call, n).returncode == -signal.SIGKILL, n
        if not (shards / "shards.json").exists():
            with pytest.raises(ShardError, match="no shards.json, so tokenizing did not finish"):
                verify_shards(shards)
            outcomes.add("refused")
        else:
            found = load_tokenizer(shards / "tokenizer.json")
            assert found.fingerprint in (old.fingerprint, new.fingerprint), n
            verify_shards(shards, found)  # every shard is the one shards.json describes
            outcomes.add("old" if found.fingerprint == old.fingerprint else "new")
        tokenize_dataset(tmp_path / "ds", tmp_path / "new.json", shards, num_workers=1)  # the rerun
        verify_shards(shards, new)
    assert outcomes >= {"old", "refused"}  # kills before the switch keep the old set; during it, refused


# --- damaged data files are refused by name ---------------------------------------------------------
@pytest.fixture
def shards_folder(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} says something"}) + "\n" for i in range(60)))
    prepare_dataset(str(src), tmp_path / "ds")
    train_tokenizer("byte", [""]).save(tmp_path / "byte.json")
    tokenize_dataset(tmp_path / "ds", tmp_path / "byte.json", tmp_path / "shards")
    return tmp_path / "shards"


@pytest.mark.parametrize(
    "how,message",
    [
        ("truncate", r"train\.bin: header says \d+ ids .* the shard is truncated"),
        ("header", r"train\.bin: not a scratchlm token shard"),
        ("version", r"train\.bin: shard format version 7"),
        ("body", r"train\.bin: sha256 differs from the one recorded in shards\.json"),
    ],
)
def test_damaged_shards_are_refused_by_name(shards_folder, how, message):
    from scratchlm.data import verify_shards

    path = shards_folder / "train.bin"
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[:-3]
    elif how == "header":
        data[0] ^= 0x01
    elif how == "version":
        data[8:12] = (7).to_bytes(4, "little")
    else:
        data[100] ^= 0x04  # one bit of one token id
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=message):
        verify_shards(shards_folder, load_tokenizer(shards_folder / "tokenizer.json"))


def test_damaged_tokenizer_and_manifest_files_are_refused_by_name(shards_folder, tmp_path):
    tokenizer = shards_folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:50])
    with pytest.raises(
        FormatError,
        match=r"tokenizer\.json: expected a 'scratchlm\.tokenizer' JSON file but it does not parse",
    ):
        load_tokenizer(tokenizer)
    manifest = tmp_path / "ds" / "manifest.json"
    content = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**content, "version": 9}))
    with pytest.raises(FormatError, match=r"manifest\.json: 'scratchlm\.dataset' version 9 is not supported"):
        Dataset.load(tmp_path / "ds")
    manifest.write_text(json.dumps(content))
    split = tmp_path / "ds" / "train.jsonl"
    split.write_bytes(split.read_bytes()[:-5])
    with pytest.raises(FormatError, match=r"train\.jsonl: sha256 does not match the manifest"):
        Dataset.load(tmp_path / "ds").documents("train")


def test_disk_full_while_writing_shards_keeps_the_old_ones(shards_folder, tmp_path, monkeypatch):
    import scratchlm.io as io

    before = {p.name: p.read_bytes() for p in shards_folder.iterdir()}
    real_fdopen = io.os.fdopen

    class FullDisk:
        """A file whose device fills up after 100 bytes."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 100:
                raise OSError(28, "No space left on device")
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(io.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left on device"):
        tokenize_dataset(tmp_path / "ds", tmp_path / "byte.json", shards_folder)
    monkeypatch.undo()
    assert {
        p.name: p.read_bytes() for p in shards_folder.iterdir()
    } == before  # old files intact, no temp left


def test_a_failure_on_a_later_shard_leaves_the_old_set_valid(shards_folder, tmp_path, monkeypatch):
    """Re-tokenizing replaces a set of files: failing on val.bin (after train.bin was written) must
    not leave a new train.bin beside an old val.bin and an old shards.json."""
    import scratchlm.data.shards as shards
    from scratchlm.data import verify_shards

    before = {p.name: p.read_bytes() for p in shards_folder.iterdir()}
    # another tokenizer, whose ids differ from the byte tokenizer's on this text: a new train.bin differs
    train_tokenizer("char", ["document 0123456789 says something"]).save(tmp_path / "other.json")
    assert (
        load_tokenizer(tmp_path / "other.json").fingerprint
        != load_tokenizer(shards_folder / "tokenizer.json").fingerprint
    )
    real = shards.write_shard

    def fail_on_val(path, ids, tokenizer):
        if "val.bin" in str(path):
            raise OSError(5, "Input/output error", str(path))
        return real(path, ids, tokenizer)

    monkeypatch.setattr(shards, "write_shard", fail_on_val)
    with pytest.raises(OSError, match="Input/output error"):
        tokenize_dataset(tmp_path / "ds", tmp_path / "other.json", shards_folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in shards_folder.iterdir()} == before  # the old set, whole
    verify_shards(shards_folder, load_tokenizer(shards_folder / "tokenizer.json"))
    tokenize_dataset(tmp_path / "ds", tmp_path / "other.json", shards_folder)
    new = load_tokenizer(shards_folder / "tokenizer.json")
    assert new.fingerprint == load_tokenizer(tmp_path / "other.json").fingerprint
    verify_shards(shards_folder, new)
    assert (shards_folder / "train.bin").read_bytes() != before["train.bin"]  # so the check above could fail
