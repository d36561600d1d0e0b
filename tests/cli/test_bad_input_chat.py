"""Bad input on the way to a chat model: each row runs the real command and checks its exit code
and its one-line message (or, for the character tokenizer trained on `scratchlm tasks` output,
that the path now works and says what it added)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def scratchlm(cwd, *argv):
    return subprocess.run(
        [sys.executable, "-m", "scratchlm", *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(cwd, *argv):
    result = scratchlm(cwd, *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def char_base(tmp_path_factory):
    """The CLI path with a character tokenizer: tasks -> corpus -> char tokenizer (12 characters:
    digits, + and =) -> shards -> a base of configs/tasks-base.toml trained for 2 steps."""
    root = tmp_path_factory.mktemp("chat-bad-input")
    (root / "configs").symlink_to(REPO / "configs")
    ok(root, "tasks", "--tasks", "addition", "--train", "200", "--test", "20", "--out", "data/tasks")
    ok(root, "data", "prepare", "data/tasks/corpus-train.txt", "--documents", "lines", "--out", "data/corpus")
    ok(root, "tokenizer", "train", "--dataset", "data/corpus", "--kind", "char", "--out", "data/char.json")
    ok(root, "tokenizer", "train", "--dataset", "data/corpus", "--kind", "byte", "--out", "data/byte.json")
    ok(root, "data", "tokenize", "--dataset", "data/corpus", "--tokenizer", "data/char.json")
    ok(
        root,
        "train",
        "--config",
        "configs/tasks-base.toml",
        *(
            "--set",
            "train.data=data/corpus/char",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_interval=2",
        ),
    )
    assert json.loads((root / "data" / "char.json").read_text())["chars"] == list("+0123456789=")
    return root


SFT = ["sft", "--checkpoint", "runs/base/best", "--data", "data/tasks/sft-train.jsonl", "--out", "runs/sft"]
SHORT = [
    *("--set", "train.max_steps=2", "--set", "train.eval_interval=2"),
    *("--set", "train.batch_size=4", "--set", "train.warmup_steps=0"),
]
NOT_UTF8 = b'{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2\xe9"}]}\n'
OUTSIDE = '{"messages": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]}\n'

# (argv, files to write first, exit code, what stderr must contain)
ROWS = {
    "sft --tokenizer of another vocabulary (byte.json on a char base)": (
        [*SFT, "--tokenizer", "data/byte.json", *SHORT],
        {},
        2,
        [
            "scratchlm: error: --tokenizer data/byte.json (byte, 257 ids",
            "is not the tokenizer",
            "was trained with (13 embedding rows",
        ],
    ),
    "sft on a non-UTF-8 file": (
        ["sft", "--checkpoint", "runs/base/best", "--data", "latin1.jsonl", "--out", "runs/x", *SHORT],
        {"latin1.jsonl": NOT_UTF8},
        2,
        [f"latin1.jsonl, line 1: byte offset {NOT_UTF8.index(0xE9)}: b'\\xe9' is not UTF-8", "iconv"],
    ),
    "sft --set train.out_dir": (
        [*SFT, "--set", "train.out_dir=elsewhere"],
        {},
        2,
        ["--set train.out_dir conflicts with --out", "use --out"],
    ),
    "dpo --beta with --set dpo.beta": (
        [
            *("dpo", "--checkpoint", "runs/base/best", "--data", "data/tasks/pairs-train.jsonl"),
            *("--out", "runs/dpo", "--beta", "0.2", "--set", "dpo.beta=0.7"),
        ],
        {},
        2,
        ["--set dpo.beta conflicts with --beta", "use --beta"],
    ),
    "char tokenizer trained on tasks output: sft adds the template's characters": (
        [*SFT, "--val-data", "data/tasks/sft-test.jsonl", *SHORT],
        {},
        0,
        ["cannot spell the chat template's role names: added '\\naeimnrstuy'"],
    ),
    "char tokenizer, a character the data has and it lacks: named, with file, line and --kind byte": (
        ["sft", "--checkpoint", "runs/base/best", "--data", "outside.jsonl", "--out", "runs/y", *SHORT],
        {"outside.jsonl": OUTSIDE.encode()},
        2,
        ["outside.jsonl, line 1: character '?' (U+003F)", "--kind byte"],
    ),
}


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_bad_input(char_base, row):
    argv, files, code, expected = ROWS[row]
    for name, data in files.items():
        (char_base / name).write_bytes(data)
    result = scratchlm(char_base, *argv)
    assert result.returncode == code, result.stderr[-2000:]
    if code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("scratchlm: error: ")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert not (char_base / "runs" / "dpo").exists() and not (char_base / "elsewhere").exists()
    for text in expected:
        assert text in result.stderr, result.stderr
