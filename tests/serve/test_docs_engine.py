"""docs/inference-engine.md's examples run as written against a model of the quickstart's shape
(the shakespeare-char preset: a 64-token context, a character tokenizer with <|endoftext|>), in a
folder laid out as `make quickstart` leaves it. Its weights are random: the examples must work
for any weights, and the page's output line must be what this model prints."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "inference-engine.md"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, shakespeare_text):
    import torch

    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.gpt import GPT
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.train.trainer import build_model_config

    root = tmp_path_factory.mktemp("quickstart_docs")
    tokenizer = CharTokenizer.train(shakespeare_text, ["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(build_model_config({"preset": "shakespeare-char"}, tokenizer.vocab_size))
    assert model.config.block_size == 64
    save_model_only(root / "runs" / "quickstart" / "gpt" / "best", model, tokenizer)
    return root


def _blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)


def test_the_llm_example_runs(quickstart):
    [code] = [b for b in _blocks(PAGE.read_text()) if b.startswith("from scratchlm.serve import LLM")]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=quickstart, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r" (length|stop) \d+\.\d+(e-\d+)?\n$", done.stdout), done.stdout[-500:]


def test_the_generate_example_runs_and_prints_the_line_shown(quickstart):
    [session] = [b for b in _blocks(PAGE.read_text()) if b.startswith("$ cat prompts.jsonl")]
    lines = session.splitlines()
    command_at = next(i for i, line in enumerate(lines) if line.startswith("$ scratchlm generate"))
    (quickstart / "prompts.jsonl").write_text("\n".join(lines[1:command_at]) + "\n")
    argv = shlex.split(lines[command_at][2:])
    done = subprocess.run(
        [sys.executable, "-m", *argv], cwd=quickstart, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in (quickstart / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1]
    shown = json.loads(lines[-1])
    assert {k: v for k, v in results[0].items() if k != "text"} == {
        k: v for k, v in shown.items() if k != "text"
    }
    # "ROMEO:" is 6 tokens: max_tokens 64 is capped at the end of the 64-token context.
    assert results[0]["prompt_tokens"] + results[0]["completion_tokens"] == 64
    for r in results:
        assert r["prompt_tokens"] + r["completion_tokens"] <= 64 and "error" not in r
