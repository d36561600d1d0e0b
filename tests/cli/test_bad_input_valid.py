"""Bad input to the inference, eval, data and tokenizer commands: each row of the issue's table runs
the real command (``scratchlm.cli.main``, or a subprocess where it needs a read-only mount) and
asserts the exit status and the message, and that no work was done before the refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from processes import UNSHARE, require_private_tmpfs

from scratchlm.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, char_shards):
    """A checkpoint with a 64-token context and a character tokenizer it records by fingerprint, the
    shards it was "trained" on, other tokenizers, and small input files."""
    import torch

    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("bad_input")
    tokenizer = load_tokenizer(Path(char_shards) / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=64, position="rope"
        )
    )
    save_model_only(root / "ckpt", model, tokenizer)
    ByteTokenizer.train(["x"]).save(root / "byte.json")
    CharTokenizer.train(["abc"], ["<|endoftext|>"]).save(root / "small.json")
    (root / "prompts.jsonl").write_text(
        '{"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}\n'
        "\n"
        '{"prompt": "JULIET:", "max_tokens": 4, "temperature": 0}\n'
    )
    (root / "good.jsonl").write_text('{"prompt": "ROMEO:", "max_tokens": 4}\n')
    (root / "long.jsonl").write_text(json.dumps({"prompt": "ROMEO: " * 20, "max_tokens": 4}) + "\n")
    (root / "small.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    (root / "empty.txt").write_text("")
    (root / "bad.txt").write_bytes(b"hello \xff world")
    (root / "a_file").write_text("not a folder")
    (root / "trailing.jsonl").write_text(
        '{"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}\n'
        '{"prompt": "JULIET:", "max_tokens": 4, "temperature": 0}\n'
        "\n  \n\n"
    )
    (root / "arith.jsonl").write_text('{"prompt": "12+", "max_tokens": 3, "temperature": 0}\n')
    (root / "empty_prompt.jsonl").write_text('{"prompt": "", "max_tokens": 4, "temperature": 0}\n')
    # A chat model (SFT's checkpoint shape: it carries its chat tokenizer, trained on a JSONL) whose base
    # was trained with a character vocabulary of arithmetic: the chat tokens grew the template's
    # characters too, so the base's <|endoftext|> moved (add_chat_tokens, moved_ids).
    from scratchlm.tokenizers.chat import add_chat_tokens, moved_ids

    plain = CharTokenizer.train(["12+30=42\n"], ["<|endoftext|>"])
    plain.save(root / "arith.json")
    grown = add_chat_tokens(plain)
    assert moved_ids(plain, grown)
    chat = GPT(GPTConfig(vocab_size=grown.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=64))
    save_model_only(root / "chat", chat, grown, train={"data": str(root / "sft-train.jsonl")}, method="sft")
    # A model whose tokenizer has neither <|endoftext|> nor a newline: nothing to start an empty prompt from.
    letters = CharTokenizer.train(["abc"])
    save_model_only(root / "nostart", GPT(GPTConfig(vocab_size=3, n_layer=1, n_head=2, d_model=32)), letters)
    return root


def read_only(folder: Path, *argv: str) -> list[str]:
    """``scratchlm argv`` in a process that sees ``folder`` as an empty read-only tmpfs (root
    ignores folder permissions, never a read-only mount)."""
    folder.mkdir(exist_ok=True)
    mount = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
    unshare = [*UNSHARE, "sh", "-c", mount, str(folder)]
    return [*unshare, sys.executable, "-m", "scratchlm", *argv]


def sample(w, *extra):
    return ["sample", "--checkpoint", str(w / "ckpt"), "--prompt", "ROMEO:", "--max-new-tokens", "5", *extra]


def generate(w, *extra, prompts="good.jsonl", out="out.jsonl"):
    return [
        "generate",
        "--checkpoint",
        str(w / "ckpt"),
        "--prompts",
        str(w / prompts),
        "--out",
        str(w / out),
        *extra,
    ]


def bigram(w, *extra):
    return ["bigram", "--dataset", str(w / "no-dataset-read"), "--tokenizer", str(w / "small.json"), *extra]


def compare(w, plot):
    return [
        "tokenizer",
        "compare",
        "--text-file",
        str(w / "small.txt"),
        "--vocab-sizes",
        "300",
        "--plot",
        plot,
    ]


# id -> (argv, exit status, a regex the output (stderr, then stdout) must contain)
CASES = {
    "eval --batch-size -3": (
        lambda w: ["eval", "--checkpoint", str(w / "ckpt"), "--shards", "{shards}", "--batch-size", "-3"],
        2,
        r"argument --batch-size: must be an integer >= 1, got '-3'",
    ),
    "eval --batch-size 0": (
        lambda w: ["eval", "--checkpoint", str(w / "ckpt"), "--shards", "{shards}", "--batch-size", "0"],
        2,
        r"argument --batch-size: must be an integer >= 1, got '0'",
    ),
    "sample --max-new-tokens 0": (
        lambda w: sample(w, "--max-new-tokens", "0"),
        2,
        r"^scratchlm: error: --max-new-tokens must be an integer >= 1, got 0$",
    ),
    "sample --max-new-tokens -5": (
        lambda w: sample(w, "--max-new-tokens", "-5"),
        2,
        r"^scratchlm: error: --max-new-tokens must be an integer >= 1, got -5$",
    ),
    "sample --num-samples 0": (
        lambda w: sample(w, "--num-samples", "0"),
        2,
        r"^scratchlm: error: --num-samples must be an integer >= 1, got 0$",
    ),
    "sample --beam 0": (
        lambda w: sample(w, "--beam", "0"),
        2,
        r"^scratchlm: error: --beam must be an integer >= 1, got 0$",
    ),
    "sample --beam -2": (
        lambda w: sample(w, "--beam", "-2"),
        2,
        r"^scratchlm: error: --beam must be an integer >= 1, got -2$",
    ),
    "sample --temperature nan": (
        lambda w: sample(w, "--temperature", "nan"),
        2,
        r"^scratchlm: error: --temperature must be a number >= 0 \(0 = greedy\), got nan$",
    ),
    "sample --temperature inf": (
        lambda w: sample(w, "--temperature", "inf"),
        2,
        r"^scratchlm: error: --temperature must be a number >= 0 \(0 = greedy\), got inf$",
    ),
    "generate --block-size 0": (
        lambda w: generate(w, "--block-size", "0"),
        2,
        r"argument --kv-block-size/--block-size: must be an integer >= 1, got '0'",
    ),
    "generate --kv-block-size 0": (
        lambda w: generate(w, "--kv-block-size", "0"),
        2,
        r"argument --kv-block-size/--block-size: must be an integer >= 1, got '0'",
    ),
    "sample --tokenizer of another vocabulary: byte": (
        lambda w: sample(w, "--tokenizer", str(w / "byte.json")),
        2,
        r"byte.json \(byte, 256 ids, fingerprint \w+\) is not the tokenizer .*ckpt was trained with "
        r"\(65 embedding rows, fingerprint \w+\): leave the tokenizer out",
    ),
    "sample --tokenizer of another vocabulary: smaller char": (
        lambda w: sample(w, "--tokenizer", str(w / "small.json")),
        2,
        r"small.json \(char, 4 ids, .*\) is not the tokenizer .*ckpt was trained with",
    ),
    "sample --tokenizer of another vocabulary: gpt2": (
        lambda w: sample(w, "--tokenizer", "gpt2"),
        2,
        r"gpt2 \(bpe, 50257 ids, .*\) is not the tokenizer .*ckpt was trained with",
    ),
    "generate --tokenizer of another vocabulary: byte": (
        lambda w: generate(w, "--tokenizer", str(w / "byte.json")),
        2,
        r"byte.json \(byte, 256 ids, .*\) is not the tokenizer .*ckpt was trained with",
    ),
    "generate --tokenizer of another vocabulary: smaller char": (
        lambda w: generate(w, "--tokenizer", str(w / "small.json")),
        2,
        r"small.json \(char, 4 ids, .*\) is not the tokenizer .*ckpt was trained with",
    ),
    "generate --tokenizer of another vocabulary: gpt2": (
        lambda w: generate(w, "--tokenizer", "gpt2"),
        2,
        r"gpt2 \(bpe, 50257 ids, .*\) is not the tokenizer .*ckpt was trained with",
    ),
    "generate into a read-only folder": (
        lambda w: read_only(w / "ro", *generate(w, out="ro/out.jsonl")),
        2,
        r"^scratchlm: error: --out .*ro/out.jsonl: cannot write in .*ro \(Read-only file system\); "
        r"choose another --out$",
    ),
    "generate into a file's path (no folder there)": (
        lambda w: generate(w, out="a_file/out.jsonl"),
        2,
        r"^scratchlm: error: --out .*a_file/out.jsonl: .*a_file is a file, not a folder; choose another --out$",
    ),
    "tokenizer compare into a read-only folder": (
        lambda w: read_only(w / "ro", *compare(w, str(w / "ro" / "compare.png"))),
        2,
        r"^scratchlm: error: --plot .*ro/compare.png: cannot write in .*ro \(Read-only file system\)",
    ),
    "tokenizer compare into a file's path": (
        lambda w: compare(w, str(w / "a_file" / "compare.png")),
        2,
        r"^scratchlm: error: --plot .*a_file/compare.png: .*a_file is a file, not a folder",
    ),
    "sample --tokenizer: the plain tokenizer of a chat model": (
        lambda w: [
            "sample",
            "--checkpoint",
            str(w / "chat"),
            "--tokenizer",
            str(w / "arith.json"),
            "--prompt",
            "12",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        0,
        r"",
    ),
    "generate --tokenizer: the plain tokenizer of a chat model": (
        lambda w: [
            "generate",
            "--checkpoint",
            str(w / "chat"),
            "--tokenizer",
            str(w / "arith.json"),
            "--prompts",
            str(w / "arith.jsonl"),
            "--out",
            str(w / "arith_out.jsonl"),
            "--json",
        ],
        0,
        r"",
    ),
    "sample --tokenizer of another vocabulary: a chat model": (
        lambda w: ["sample", "--checkpoint", str(w / "chat"), "--tokenizer", str(w / "byte.json")],
        2,
        r"byte.json \(byte, 256 ids, .*\) is not the tokenizer .*chat was trained with \(\d+ embedding rows, "
        r"fingerprint \w+\): leave the tokenizer out \(no --tokenizer\): .*chat carries the tokenizer it was "
        r"trained with$",
    ),
    "eval of a post-trained checkpoint without --shards": (
        lambda w: ["eval", "--checkpoint", str(w / "chat")],
        2,
        r"^scratchlm: error: .*chat was trained on conversations \(sft on .*sft-train.jsonl\), not on token "
        r"shards: pass --shards DIR",
    ),
    "generate input with blank lines at the end": (
        lambda w: generate(w, "--json", prompts="trailing.jsonl", out="trailing_out.jsonl"),
        0,
        r"",
    ),
    "generate with an empty prompt": (
        lambda w: generate(w, "--json", prompts="empty_prompt.jsonl", out="empty_out.jsonl"),
        0,
        r"",
    ),
    "sample --prompt '' with a tokenizer that has no start": (
        lambda w: ["sample", "--checkpoint", str(w / "nostart"), "--prompt", "", "--max-new-tokens", "2"],
        2,
        r"^scratchlm: error: an empty prompt starts from <\|endoftext\|> or a newline, and this tokenizer "
        r"\(char, 3 ids\) has neither: give a prompt$",
    ),
    "generate with an empty prompt and a tokenizer that has no start": (
        lambda w: [
            "generate",
            "--checkpoint",
            str(w / "nostart"),
            "--prompts",
            str(w / "empty_prompt.jsonl"),
            "--out",
            str(w / "nostart_out.jsonl"),
            "--json",
        ],
        2,
        r"^scratchlm: error: 1 of 1 requests failed",
    ),
    "bigram --max-new-tokens -5": (
        lambda w: bigram(w, "--max-new-tokens", "-5"),
        2,
        r"^scratchlm: error: --max-new-tokens must be an integer >= 1, got -5$",
    ),
    "bigram --num-samples 0": (
        lambda w: bigram(w, "--num-samples", "0"),
        2,
        r"^scratchlm: error: --num-samples must be an integer >= 1, got 0$",
    ),
    "sample --max-new-tokens 1e1 (integers read as on every flag)": (
        lambda w: sample(w, "--max-new-tokens", "1e1", "--json"),
        0,
        r"",
    ),
    "tasks --train 1e1 (integers read as on every flag)": (
        lambda w: ["tasks", "--train", "1e1", "--test", "0", "--out", str(w / "tasks")],
        0,
        r"",
    ),
    "sample --beam with sampling flags": (
        lambda w: sample(w, "--beam", "2", "--temperature", "0.8", "--num-samples", "2"),
        2,
        r"^scratchlm: error: --beam is beam search, which is deterministic: it cannot honour --temperature, "
        r"--num-samples; leave them out, or leave --beam out to sample$",
    ),
    "sample --beam with --top-k, --top-p": (
        lambda w: sample(w, "--top-p", "0.9", "--beam", "2", "--top-k", "5"),
        2,
        r"cannot honour --top-k, --top-p; leave them out",
    ),
    "sample --length-penalty without --beam": (
        lambda w: sample(w, "--length-penalty", "1.5"),
        2,
        r"^scratchlm: error: --length-penalty is for beam search: add --beam N, or leave it out$",
    ),
    "generate input with a blank line": (
        lambda w: generate(w, "--json", prompts="prompts.jsonl", out="blank.jsonl"),
        2,
        r"^scratchlm: error: 1 of 3 requests failed",
    ),
    "generate with a prompt that fills the context": (
        lambda w: generate(w, "--json", prompts="long.jsonl", out="long_out.jsonl"),
        2,
        r"^scratchlm: error: 1 of 1 requests failed",
    ),
    "sample with a prompt longer than the context": (
        lambda w: [
            "sample",
            "--checkpoint",
            str(w / "ckpt"),
            "--prompt",
            "ROMEO: " * 20,
            "--max-new-tokens",
            "2",
        ],
        0,
        r"^scratchlm: warning: the prompt is 140 tokens and this model's context 64: its first 76 tokens are "
        r"dropped \(the model sees the last 64\)$",
    ),
    "tokenizer train --vocab-size 1e9": (
        lambda w: [
            "tokenizer",
            "train",
            "--text-file",
            str(w / "small.txt"),
            "--vocab-size",
            "1e9",
            "--out",
            str(w / "big.json"),
            "--quiet",
        ],
        0,
        r"^scratchlm: warning: the vocabulary stopped at \d+ of the 1,000,000,000 asked: the text has no "
        r"more pairs to merge",
    ),
    "tokenizer train char --vocab-size 5": (
        lambda w: [
            "tokenizer",
            "train",
            "--text-file",
            str(w / "small.txt"),
            "--kind",
            "char",
            "--vocab-size",
            "5",
            "--out",
            str(w / "char5.json"),
        ],
        2,
        r"^scratchlm: error: --vocab-size is for BPE: a char vocabulary is the set of characters of the "
        r"text plus the special tokens; leave --vocab-size out, or use --kind bpe$",
    ),
    "tokenizer train on empty input": (
        lambda w: [
            "tokenizer",
            "train",
            "--text-file",
            str(w / "empty.txt"),
            "--kind",
            "char",
            "--out",
            str(w / "empty.json"),
        ],
        2,
        r"^scratchlm: error: .*empty.txt is empty: there is no text to train a tokenizer on$",
    ),
    "data prepare --fractions 1,0,0": (
        lambda w: [
            "data",
            "prepare",
            str(w / "small.txt"),
            "--fractions",
            "1,0,0",
            "--out",
            str(w / "all_train"),
        ],
        0,
        r"^scratchlm: note: no val and no test split \(--fractions 1,0,0\)",
    ),
    "a non-UTF-8 text file": (
        lambda w: [
            "tokenizer",
            "train",
            "--text-file",
            str(w / "bad.txt"),
            "--kind",
            "char",
            "--out",
            str(w / "bad.json"),
        ],
        2,
        r"^scratchlm: error: .*bad.txt: invalid UTF-8 at byte offset 6 \(bytes b'\\xff wo'\); fix the "
        r"file, or pass --errors replace",
    ),
}


@pytest.mark.parametrize("row", list(CASES))
def test_bad_input(row, world, char_shards, capsys):
    import re

    build, status, message = CASES[row]
    argv = [a.replace("{shards}", str(char_shards)) for a in build(world)]
    if argv[: len(UNSHARE)] == UNSHARE:
        require_private_tmpfs("a real read-only folder (root ignores folder permissions)")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        code = main(argv)
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    assert code == status, (row, out[-2000:], err[-2000:])
    assert re.search(message, err, re.MULTILINE), (row, err[-2000:])
    assert "Traceback" not in err
    if status == 2 and "requests failed" not in message:
        assert out == "", row  # refused before any work: nothing generated, trained or reported
    if "plain tokenizer of a chat model" in row and row.startswith("sample"):
        [reply] = json.loads(out)["samples"]
        assert isinstance(reply["text"], str)
    if "plain tokenizer of a chat model" in row and row.startswith("generate"):
        [result] = [json.loads(line) for line in (world / "arith_out.jsonl").read_text().splitlines()]
        assert result["completion_tokens"] == 3 and "error" not in result
    if row == "generate input with blank lines at the end":
        results = [json.loads(line) for line in (world / "trailing_out.jsonl").read_text().splitlines()]
        assert [(r["index"], r["completion_tokens"]) for r in results] == [(0, 4), (1, 4)]
    if row == "generate with an empty prompt":
        [result] = [json.loads(line) for line in (world / "empty_out.jsonl").read_text().splitlines()]
        assert (
            result["prompt_tokens"] == 1 and result["completion_tokens"] == 4
        )  # from "\n", as sample starts
    if row == "generate with an empty prompt and a tokenizer that has no start":
        [result] = [json.loads(line) for line in (world / "nostart_out.jsonl").read_text().splitlines()]
        assert "this tokenizer (char, 3 ids) has neither: give a prompt" in result["error"]
    if row == "sample --max-new-tokens 1e1 (integers read as on every flag)":
        assert len(json.loads(out)["samples"]) == 1
    if row == "generate input with a blank line":
        results = [json.loads(line) for line in (world / "blank.jsonl").read_text().splitlines()]
        assert [r["index"] for r in results] == [0, 1, 2]  # one output per input line, index = line - 1
        assert results[1]["error"].startswith("line 2: blank line")
        assert results[0]["text"] is not None and results[2]["completion_tokens"] == 4
    if row == "generate with a prompt that fills the context":
        [result] = [json.loads(line) for line in (world / "long_out.jsonl").read_text().splitlines()]
        assert "the prompt is 140 tokens; this model's context is 64 tokens" in result["error"]
    if row == "data prepare --fractions 1,0,0":
        assert "data leakage" not in err
        manifest = json.loads((world / "all_train" / "manifest.json").read_text())
        assert [manifest["splits"][s]["documents"] for s in ("train", "val", "test")] == [1, 0, 0]
    if row == "tokenizer train --vocab-size 1e9":
        assert json.loads((world / "big.json").read_text())["type"] == "bpe"


def test_eval_of_a_chat_model_on_its_base_shards_equals_eval_on_shards_of_its_own_tokenizer(world, capsys):
    """``eval --shards`` of the base's shards: the chat model's tokenizer is the base's grown with the chat
    tokens (found from the checkpoint, not from its JSONL), and the shards' ids follow the special tokens
    that the growth moved — the same loss as on shards made with the chat tokenizer itself."""
    import random

    from scratchlm.data import prepare_dataset, tokenize_dataset
    from scratchlm.tokenizers import load_tokenizer

    rng = random.Random(0)
    lines = []
    for _ in range(300):
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        lines.append(f"{a}+{b}={a + b}".translate(str.maketrans("56789", "12340")))
    (world / "arith.txt").write_text("\n".join(lines) + "\n")
    ds, _ = prepare_dataset(str(world / "arith.txt"), world / "arith_ds", documents="lines")
    base = tokenize_dataset(ds, world / "arith.json", world / "arith_base")["path"]
    load_tokenizer(world / "chat" / "tokenizer.json").save(world / "arith_chat.json")
    own = tokenize_dataset(ds, world / "arith_chat.json", world / "arith_own")["path"]
    losses = []
    for shards in (base, own):
        code = main(["eval", "--checkpoint", str(world / "chat"), "--shards", str(shards), "--json"])
        assert code == 0, capsys.readouterr().err
        report = json.loads(capsys.readouterr().out)
        losses.append([report["splits"][s]["loss"] for s in ("val", "test")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
