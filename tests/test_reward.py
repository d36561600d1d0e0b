"""Reward model (issue 8, section 4): the Bradley–Terry loss by hand, a model that separates
checkable pairs on held-out data (accuracy >= 0.95), its checkpoint (an ordinary GPT plus a head
file) and what goes wrong when the files do not fit."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from scratchlm.posttrain.reward import collate_full, load_reward_model, reward_loss


def test_the_loss_is_bradley_terry_by_hand():
    loss, m = reward_loss(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.5]))
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == pytest.approx(0.75)
    assert reward_loss(torch.zeros(3), torch.zeros(3))[0].item() == pytest.approx(math.log(2))


def test_collate_full_points_at_each_rows_last_token():
    x, last = collate_full([[5, 6, 7], [8]], pad_id=0)
    assert x.tolist() == [[5, 6, 7], [8, 0, 0]] and last.tolist() == [2, 0]


def _pairs(path, n: int, seed: int) -> None:
    """Separable pairs: the rejected reply contains a 'z', the chosen one never does."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxy"
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice(letters) for _ in range(4))
            spot = rng.randrange(4)
            bad = word[:spot] + "z" + word[spot + 1 :]
            f.write(json.dumps({"prompt": f"{rng.randrange(10)}+{rng.randrange(10)}=", "chosen": word,
                                "rejected": bad}) + "\n")


def test_reward_model_separates_held_out_pairs_and_its_checkpoint_loads(task_base, tmp_path, capsys):
    from scratchlm.cli import main

    _pairs(tmp_path / "train.jsonl", 400, 0)
    _pairs(tmp_path / "test.jsonl", 64, 1)
    out = tmp_path / "rm"
    assert main(["reward-model", "--checkpoint", str(task_base / "base"), "--data", str(tmp_path / "train.jsonl"),
                 "--val-data", str(tmp_path / "test.jsonl"), "--out", str(out), "--json",
                 "--set", "train.max_steps=120", "--set", "train.eval_interval=60", "--set", "train.lr=3e-3"]) == 0
    report = json.loads(capsys.readouterr().out)
    evals = report["eval"]
    assert evals[-1]["val_accuracy"] >= 0.95, evals
    assert evals[-1]["val_loss"] < math.log(2) - 0.3
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(steps[0])

    # The checkpoint: an ordinary GPT (the engine and `sample` read it) plus the head file.
    assert (out / "best" / "reward_head.safetensors").exists()
    from scratchlm.models.checkpoint import load_model_from_checkpoint

    load_model_from_checkpoint(out / "best")
    rm = load_reward_model(out / "last")
    prompt = [{"role": "user", "content": "1+2="}]
    r = rm([prompt, prompt], ["abcd", "abzd"])
    assert r[0] > r[1]
    assert rm.score_one(prompt, "abcd") == pytest.approx(r[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="not a reward model checkpoint"):
        load_reward_model(task_base / "base")

    # Resume continues the run (the head comes back from its file, the optimizer state with it).
    main(["reward-model", "--checkpoint", str(task_base / "base"), "--data", str(tmp_path / "train.jsonl"),
          "--val-data", str(tmp_path / "test.jsonl"), "--out", str(out), "--resume", "--json",
          "--set", "train.max_steps=140", "--set", "train.eval_interval=60", "--set", "train.lr=3e-3"])
    again = json.loads(capsys.readouterr().out)
    assert again["steps"] == 140 and again["eval"][-1]["val_accuracy"] >= 0.95
    # A resume under another method's command is refused, naming both.
    assert main(["dpo", "--checkpoint", str(task_base / "base"), "--data", str(tmp_path / "train.jsonl"),
                 "--out", str(out), "--resume", "--set", "train.max_steps=150"]) == 2
    assert "is a reward_model run's checkpoint, not dpo's" in capsys.readouterr().err


def test_reward_model_resumes_exactly(task_base, tmp_path):
    """20 steps + resume + 20 equal 40 straight: the head and its optimizer state come back (a
    constant learning rate, so that stopping at 20 is the only difference)."""
    from scratchlm.posttrain.reward import train_reward_model

    _pairs(tmp_path / "train.jsonl", 100, 0)
    cfg = {"base": str(task_base / "base"), "data": str(tmp_path / "train.jsonl"), "val_fraction": 0.2}
    train = {"max_steps": 40, "eval_interval": 20, "lr": 3e-3, "min_lr": 3e-3, "warmup_steps": 0, "batch_size": 8}  # constant lr
    train_reward_model(cfg, {**train, "out_dir": str(tmp_path / "straight")}, progress=False)
    train_reward_model(cfg, {**train, "out_dir": str(tmp_path / "resumed"), "max_steps": 20}, progress=False)
    train_reward_model(cfg, {**train, "out_dir": str(tmp_path / "resumed")}, progress=False, resume=True)
    losses = {name: [(r["loss"], r["accuracy"]) for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text()
                                                              .splitlines()) if "loss" in r] for name in ("straight", "resumed")}
    assert len(losses["straight"]) == 40 and losses["resumed"] == losses["straight"]
