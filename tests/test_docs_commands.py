"""The docs pages a user follows start to end, executed: every ``scratchlm ...`` command of their
```bash (or bare ```) blocks, in order, in a fresh folder, so the docs and the command line cannot
drift apart (a renamed flag, a removed command or a changed default path fails here).

The tiny-settings rule (the only changes made to a page's commands, all in :data:`TINY`): a
command keeps every word the page gives it, and gets settings appended that make it fast —
``tasks`` writes fewer problems (``--train``/``--test`` replaced), and each training command
(``train``, ``sft``, ``dpo``, ``grpo``, ...) gets ``--set train.max_steps=N`` (and a matching
``train.eval_interval``, plus smaller rollouts for GRPO) after its own flags, where a later
``--set`` of the same key wins. The folder holds ``configs/`` (a link to the repository's), as a
user's checkout does; the commands run as ``python -m scratchlm`` with this checkout's code.

``tests/test_golden_path.py`` runs ``docs/first-chat-model.md`` this way and checks what the path
promises (a chat reply that a ``transformers`` model of the export reproduces); this file checks
that every command of the pages parses with the real parser (no run needed), and that a page
parses into the path it claims to be.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# Pages a user follows from start to end: each one's commands run in order (test_golden_path.py).
FOLLOWED_PAGES = ("first-chat-model.md",)

# The tiny-settings rule: {command: (flags whose value is replaced, words appended)}.
_STEPS = "--set train.max_steps={n} --set train.eval_interval={n}"
TINY: dict[str, tuple[dict[str, str], str]] = {
    "tasks": ({"--train": "300", "--test": "20"}, ""),
    "train": ({}, _STEPS.format(n=30) + " --set train.batch_size=16"),
    "sft": ({}, _STEPS.format(n=30)),
    "dpo": ({}, _STEPS.format(n=4)),
    "grpo": ({}, _STEPS.format(n=2) + " --set grpo.prompts_per_rollout=4 --set grpo.samples_per_prompt=4"),
    "ppo": ({}, _STEPS.format(n=2) + " --set ppo.prompts_per_rollout=4"),
    "reward-model": ({}, _STEPS.format(n=4)),
}


def page_commands(page: Path) -> list[list[str]]:
    """The ``scratchlm`` commands of a page's ```bash and bare ``` blocks, in order, as argv lists
    (a trailing backslash continues a line; ``#`` comments go, as in a shell)."""
    commands = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S):
        if language not in ("", "bash", "sh", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line.removeprefix("$ "), comments=True)
            if words and words[0] == "scratchlm":
                commands.append(words[1:])
    return commands


def command_name(argv: list[str]) -> str:
    """``sft`` for ``sft --checkpoint ...``, ``data prepare`` for ``data prepare x ...``."""
    from scratchlm.cli import NAMESPACES

    return " ".join(argv[:2]) if argv[0] in NAMESPACES else argv[0]


def tiny(argv: list[str]) -> list[str]:
    """``argv`` with the tiny settings of :data:`TINY` (unchanged for other commands)."""
    replace, append = TINY.get(command_name(argv), ({}, ""))
    out = list(argv)
    for flag, value in replace.items():
        if flag in out:
            out[out.index(flag) + 1] = value
    return out + shlex.split(append)


def run_page(page: Path, folder: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run the page's commands in order in ``folder`` (with ``configs/`` linked in), each with the
    tiny settings; the first failure stops it with the command, its exit code and stderr."""
    (folder / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = []
    for argv in page_commands(page):
        argv = tiny(argv)
        result = subprocess.run(
            [sys.executable, "-m", "scratchlm", *argv],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, (
            f"{page.name}: `scratchlm {shlex.join(argv)}` exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
        done.append(result)
    return done


@pytest.mark.parametrize("name", FOLLOWED_PAGES)
def test_every_command_of_the_page_parses(name):
    """Each command is one the parser knows, with flags it knows (argparse exits 2 otherwise)."""
    from scratchlm.cli import build_parser

    commands = page_commands(DOCS / name)
    assert commands, f"{name} has no scratchlm commands"
    for argv in commands:
        build_parser().parse_args(argv)
        build_parser().parse_args(tiny(argv))


def test_first_chat_model_is_the_whole_path():
    """The page goes from nothing to an exported chat model, through every stage, in order."""
    names = [command_name(argv) for argv in page_commands(DOCS / "first-chat-model.md")]
    path = ["tasks", "data prepare", "tokenizer train", "data tokenize", "train", "sft", "dpo", "grpo"]
    path += ["sample", "model export"]
    positions = [names.index(stage) for stage in path]
    assert positions == sorted(positions), names


def test_the_tiny_rule_only_appends_and_replaces_values():
    argv = ["sft", "--checkpoint", "runs/base/best", "--set", "train.lr=1e-3"]
    assert tiny(argv)[: len(argv)] == argv
    assert tiny(["tasks", "--train", "5000", "--out", "d"]) == ["tasks", "--train", "300", "--out", "d"]
    assert tiny(["sample", "--checkpoint", "x"]) == ["sample", "--checkpoint", "x"]
