"""The run header's "tokens per step" line says what a method's batch is: SFT's conversations and
DPO's pairs are padded to the longest sequence, not context windows, and a DPO step runs two
sequences per pair; GRPO's batches are replies of its rollouts. Each through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def header(command: str, root, *extra: str) -> list[str]:
    data = {"sft": "sft-train.jsonl", "dpo": "pairs-train.jsonl", "grpo": "prompts-train.jsonl"}[command]
    done = subprocess.run(
        [sys.executable, "-m", "scratchlm", command, "--checkpoint", str(root / "base"),
         "--data", str(root / "tasks" / data), "--out", str(root / f"{command}-header"), "--overwrite",
         "--set", "train.batch_size=4", "--set", "train.grad_accum=2", "--set", "train.max_steps=1",
         "--set", "train.eval_interval=1", "--set", "train.warmup_steps=0", *extra, "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return [line for line in done.stderr.splitlines() if line.startswith(("tokens per step:", "rollouts:"))]


@pytest.mark.parametrize(
    "command,extra,expected",
    [
        (
            "sft",
            (),
            ["tokens per step: up to 384 = 4 conversations x up to 48 tokens (padded to the longest) x 2 "
             "grad-accum x 1 process"],
        ),
        (
            "sft",
            ("--set", "sft.packing=true"),
            ["tokens per step: up to 384 = 4 rows of packed conversations x up to 48 tokens (padded to the "
             "longest) x 2 grad-accum x 1 process"],
        ),
        (
            "dpo",
            (),
            ["tokens per step: up to 768 = 4 pairs (8 sequences) x up to 48 tokens (padded to the longest) x 2 "
             "grad-accum x 1 process"],
        ),
        (
            "grpo",
            ("--set", "grpo.prompts_per_rollout=2", "--set", "grpo.samples_per_prompt=4",
             "--set", "grpo.max_new_tokens=8"),
            ["tokens per step: up to 384 = 4 replies (prompt + reply) x up to 48 tokens x 2 grad-accum x 1 process",
             "rollouts: 2 prompts x 4 samples = 8 replies of up to 8 new tokens, trained on for 1 step (1 epoch)"],
        ),
    ],
    ids=["sft", "sft-packed", "dpo", "grpo"],
)  # fmt: skip
def test_the_header_counts_a_methods_own_batches(task_base, command, extra, expected):
    assert header(command, task_base, *extra) == expected
