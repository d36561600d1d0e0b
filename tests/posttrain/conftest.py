"""Post-training fixtures that generalise: the copy task, whose held-out problems a small model
answers after a few hundred steps (one-digit addition has only 7 held-out problems, too few to
learn arithmetic from and to measure it on)."""

from __future__ import annotations

import pytest


def tasks_and_base(root, tasks: list[str], train: int, test: int, alphabet: str):
    """Task data under ``root/tasks`` and a randomly initialised base under ``root/base``: a small
    RoPE/RMSNorm/SwiGLU model with a character tokenizer over ``alphabet`` and ``<|endoftext|>``."""
    import torch

    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.posttrain.data import write_task_data
    from scratchlm.tokenizers import CharTokenizer

    write_task_data(root / "tasks", tasks, train=train, test=test, difficulty=1)
    tok = CharTokenizer.train(alphabet, ["<|endoftext|>"])
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        n_head=4,
        d_model=64,
        block_size=48,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        dropout=0.0,
    )
    save_model_only(root / "base", GPT(config), tokenizer=tok)
    return root


@pytest.fixture(scope="module")
def task_base(tmp_path_factory):
    """1-digit addition task data (80 training, 6 held-out problems) and a base (``root/tasks``,
    ``root/base``)."""
    return tasks_and_base(
        tmp_path_factory.mktemp("posttrain"), ["addition"], 80, 6, "0123456789+=\n abcdefghijklmnopqrstuvwxyz"
    )


@pytest.fixture(scope="session")
def copy_tasks(tmp_path_factory):
    """Copy-task data (``copy abcdef:`` -> ``abcdef``; 200 training, 40 held-out problems) and a
    base whose character tokenizer holds ``:`` (``root/tasks``, ``root/base``)."""
    return tasks_and_base(
        tmp_path_factory.mktemp("copy"), ["copy"], 200, 40, "0123456789+=:\n abcdefghijklmnopqrstuvwxyz"
    )


@pytest.fixture(scope="session")
def copy_sft(copy_tasks):
    """SFT of the copy base for 300 steps, validated on the held-out ``sft-test.jsonl``:
    ``(root, summary)`` with the run in ``root/sft`` (tests read it, never write there)."""
    from scratchlm.posttrain.sft import sft

    root = copy_tasks
    summary = sft(
        {
            "base": str(root / "base"),
            "data": str(root / "tasks" / "sft-train.jsonl"),
            "val_data": str(root / "tasks" / "sft-test.jsonl"),
        },
        {
            "out_dir": str(root / "sft"),
            "max_steps": 300,
            "eval_interval": 100,
            "batch_size": 16,
            "lr": 3e-3,
            "log_interval": 50,
        },
        progress=False,
    )
    return root, summary
