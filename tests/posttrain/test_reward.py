"""Reward model: the Bradley–Terry loss by hand, a model that separates
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
            f.write(
                json.dumps(
                    {"prompt": f"{rng.randrange(10)}+{rng.randrange(10)}=", "chosen": word, "rejected": bad}
                )
                + "\n"
            )


def test_reward_model_separates_held_out_pairs_and_its_checkpoint_loads(task_base, tmp_path, capsys):
    from scratchlm.cli import main

    _pairs(tmp_path / "train.jsonl", 400, 0)
    _pairs(tmp_path / "test.jsonl", 64, 1)
    out = tmp_path / "rm"
    assert (
        main(
            [
                "reward-model",
                "--checkpoint",
                str(task_base / "base"),
                "--data",
                str(tmp_path / "train.jsonl"),
                "--val-data",
                str(tmp_path / "test.jsonl"),
                "--out",
                str(out),
                "--json",
                "--set",
                "train.max_steps=120",
                "--set",
                "train.eval_interval=60",
                "--set",
                "train.lr=3e-3",
            ]
        )
        == 0
    )
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
    assert (
        main(
            [
                "reward-model",
                "--checkpoint",
                str(task_base / "base"),
                "--data",
                str(tmp_path / "train.jsonl"),
                "--val-data",
                str(tmp_path / "test.jsonl"),
                "--out",
                str(out),
                "--resume",
                "--json",
                "--set",
                "train.max_steps=140",
                "--set",
                "train.eval_interval=60",
                "--set",
                "train.lr=3e-3",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    again = json.loads(captured.out)
    assert "resumed from" in captured.err and "at step 120" in captured.err  # not a fresh start
    logged = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 140  # one record per step
    assert again["steps"] == 140 and again["eval"][-1]["val_accuracy"] >= 0.95
    # A resume under another method's command is refused, naming both.
    assert (
        main(
            [
                "dpo",
                "--checkpoint",
                str(task_base / "base"),
                "--data",
                str(tmp_path / "train.jsonl"),
                "--out",
                str(out),
                "--resume",
                "--set",
                "train.max_steps=150",
            ]
        )
        == 2
    )
    assert "is a reward_model run's checkpoint, not dpo's" in capsys.readouterr().err


def test_reward_model_resumes_exactly(task_base, tmp_path):
    """20 steps + resume + 20 equal 40 straight: the head and its optimizer state come back (a
    constant learning rate, so that stopping at 20 is the only difference)."""
    from scratchlm.posttrain.reward import train_reward_model

    _pairs(tmp_path / "train.jsonl", 100, 0)
    cfg = {"base": str(task_base / "base"), "data": str(tmp_path / "train.jsonl"), "val_fraction": 0.2}
    train = {
        "max_steps": 40,
        "eval_interval": 20,
        "lr": 3e-3,
        "min_lr": 3e-3,
        "warmup_steps": 0,
        "batch_size": 8,
    }  # constant lr
    train_reward_model(cfg, {**train, "out_dir": str(tmp_path / "straight")}, progress=False)
    train_reward_model(cfg, {**train, "out_dir": str(tmp_path / "resumed"), "max_steps": 20}, progress=False)
    train_reward_model(cfg, {**train, "out_dir": str(tmp_path / "resumed")}, progress=False, resume=True)
    losses = {
        name: [
            (r["loss"], r["accuracy"])
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
        for name in ("straight", "resumed")
    }
    assert len(losses["straight"]) == 40 and losses["resumed"] == losses["straight"]


def test_a_checkpoint_saved_while_the_head_bias_was_trained_resumes(task_base, tmp_path, capsys):
    """Before the head's bias was frozen, the optimizer kept state for it. Such a checkpoint (made
    here by training 2 steps with the bias trainable, from 0.25) resumes: that state is dropped,
    with one line saying so, and the bias keeps its saved value. Loaded without the migration,
    the optimizer state is refused with the parameter's name, not torch's group-size mismatch."""
    from safetensors.torch import load_file

    from scratchlm.models.checkpoint import FormatError, load_model_from_checkpoint, read_state
    from scratchlm.posttrain.base import CHAT_TRAIN_DEFAULTS
    from scratchlm.posttrain.reward import (
        HEAD_FILE,
        RewardConfig,
        RewardTrainer,
        add_scalar_head,
        train_reward_model,
    )
    from scratchlm.train.checkpoint import load_optimizers
    from scratchlm.train.config import TrainConfig
    from scratchlm.train.optim import param_groups
    from scratchlm.train.trainer import run_trainer

    class BiasTrained(RewardTrainer):  # the head as it was trained before
        def _initial_model(self):
            model = super()._initial_model()
            with torch.no_grad():
                model.score.bias.fill_(0.25)
            model.score.bias.requires_grad_(True)
            return model

    _pairs(tmp_path / "train.jsonl", 40, 0)
    cfg = {"base": str(task_base / "base"), "data": str(tmp_path / "train.jsonl"), "val_fraction": 0.2}
    train = {"max_steps": 2, "eval_interval": 2, "lr": 3e-3, "batch_size": 4, "out_dir": str(tmp_path / "rm")}
    run_trainer(
        lambda: BiasTrained(
            RewardConfig.from_dict(cfg),
            TrainConfig.from_dict({**CHAT_TRAIN_DEFAULTS, **train}),
            progress=False,
        )
    )
    old = tmp_path / "rm" / "last"
    state = read_state(old)
    assert any("score.bias" in g["params"] for g in state["optimizers"][0]["param_groups"])  # the old kind
    saved_bias = load_file(str(old / HEAD_FILE))["bias"]

    model, _ = load_model_from_checkpoint(old)
    add_scalar_head(model).bias.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0))
    with pytest.raises(FormatError, match=r"does not train \(frozen now\): \['score\.bias'\]"):
        load_optimizers(old, model, [optimizer], state)

    capsys.readouterr()
    summary = train_reward_model(cfg, {**train, "max_steps": 4}, progress=False, resume=True)
    assert summary["steps"] == 4
    log = capsys.readouterr().err
    assert (
        log.count("saved while the reward head's bias was still trained: its optimizer state is dropped") == 1
    )
    assert f"frozen at its saved value {saved_bias.item():g}" in log
    assert torch.equal(load_file(str(tmp_path / "rm" / "last" / HEAD_FILE))["bias"], saved_bias)
    assert not any(
        "score.bias" in g["params"]
        for g in read_state(tmp_path / "rm" / "last")["optimizers"][0]["param_groups"]
    )


SHARDED_NAMES_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
from scratchlm.models.checkpoint import FormatError
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.checkpoint import _split_optimizer_states
from scratchlm.train.checkpoint import load_optimizers, optimizer_states
from safetensors.torch import save_file

torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=8, block_size=8))
fully_shard(model.blocks[0]); fully_shard(model)
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward(); opt.step()
tensors, meta = _split_optimizer_states(optimizer_states(model, [opt], sharded=True))
save_file(tensors, {folder!r} + "/optimizer.safetensors")
import scratchlm.train.checkpoint as ckpt
ckpt.load_tensors = lambda folder, name: tensors  # (no state.json with checksums here)
load_optimizers({folder!r}, model, [opt], {{"optimizers": meta}}, sharded=True)  # the genuine state loads
meta[0]["param_groups"][0]["params"].append("score.bias")
try:
    load_optimizers({folder!r}, model, [opt], {{"optimizers": meta}}, sharded=True)
    print("LOADED")
except FormatError as e:
    print("REFUSED", e)
dist.destroy_process_group()
"""


def test_the_sharded_optimizer_load_refuses_a_name_the_model_lacks(tmp_path):
    """Under FSDP, torch's set_optimizer_state_dict skips a saved name it does not know; the
    checkpoint's names are checked before it as on one process (a 1-rank gloo group, fully_shard)."""
    import sys

    from processes import REPO, run_in_own_group

    script = tmp_path / "names.py"
    script.write_text(
        SHARDED_NAMES_SCRIPT.format(repo=str(REPO), store=str(tmp_path / "store"), folder=str(tmp_path))
    )
    result = run_in_own_group([sys.executable, str(script)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "REFUSED" in result.stdout and "names parameters this model lacks: ['score.bias']" in result.stdout
    ), result.stdout


RM_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from scratchlm.posttrain.reward import train_reward_model
train_reward_model({cfg!r}, {train!r}, progress=False, resume={resume!r})
"""


def _torchrun(tmp_path, name: str, cfg: dict, train: dict, resume: bool = False):
    from processes import REPO, torchrun

    script = tmp_path / f"rm-{name}-{int(resume)}.py"
    script.write_text(RM_SCRIPT.format(repo=str(REPO), cfg=cfg, train=train, resume=resume))
    result = torchrun(script, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # ~25 s (76 s on busy cores): four two-rank launches
def test_reward_model_under_fsdp_equals_ddp_and_resumes_exactly(task_base, tmp_path):
    """Two gloo ranks, train.strategy = "fsdp", a base with untied embeddings (its language-model
    head frozen): the network and the scalar head (a unit of its own, its gradient reduced over
    ranks) equal a 2-rank DDP run's within 1e-6; the head file holds the whole head; 2 steps +
    resume + 2 equal 4 straight, bit for bit; the checkpoint scores as the DDP one does."""
    from safetensors.torch import load_file

    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, read_state, save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    tok = load_checkpoint_tokenizer(task_base / "base", read_state(task_base / "base"))
    torch.manual_seed(0)
    untied = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, block_size=48, tie_embeddings=False
        )
    )
    save_model_only(tmp_path / "untied", untied, tokenizer=tok)
    _pairs(tmp_path / "train.jsonl", 100, 0)
    cfg = {"base": str(tmp_path / "untied"), "data": str(tmp_path / "train.jsonl"), "val_fraction": 0.2}
    train = {
        "max_steps": 4,
        "eval_interval": 2,
        "lr": 3e-3,
        "min_lr": 3e-3,
        "warmup_steps": 0,
        "batch_size": 4,
    }
    _torchrun(tmp_path, "ddp", cfg, {**train, "out_dir": str(tmp_path / "ddp")})
    _torchrun(tmp_path, "fsdp", cfg, {**train, "strategy": "fsdp", "out_dir": str(tmp_path / "fsdp")})
    _torchrun(
        tmp_path,
        "resumed",
        cfg,
        {**train, "strategy": "fsdp", "out_dir": str(tmp_path / "resumed"), "max_steps": 2},
    )
    _torchrun(
        tmp_path,
        "resumed",
        cfg,
        {**train, "strategy": "fsdp", "out_dir": str(tmp_path / "resumed")},
        resume=True,
    )

    for name in ("model.safetensors", "reward_head.safetensors"):
        ddp, fsdp, resumed = (
            load_file(str(tmp_path / run / "last" / name)) for run in ("ddp", "fsdp", "resumed")
        )
        assert ddp.keys() == fsdp.keys() == resumed.keys()
        for k in ddp:
            torch.testing.assert_close(fsdp[k], ddp[k], atol=1e-6, rtol=0)
            assert torch.equal(resumed[k], fsdp[k]), (name, k)
    assert fsdp["weight"].shape == (1, 32) and fsdp["bias"].tolist() == [0.0]  # whole; the bias stays 0
    records = {
        run: [
            (r["loss"], r["grad_norm"], r["accuracy"])
            for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
        for run in ("ddp", "fsdp", "resumed")
    }
    assert len(records["fsdp"]) == 4 and records["resumed"] == records["fsdp"]
    for (a, ga, _), (b, gb, _) in zip(records["ddp"], records["fsdp"]):
        assert b == pytest.approx(a, abs=1e-6) and gb == pytest.approx(ga, rel=1e-5)
    assert records["fsdp"][-1][0] < records["fsdp"][0][0]  # it learns
    prompt = [{"role": "user", "content": "1+2="}]
    scored = [
        load_reward_model(tmp_path / run / "last")([prompt, prompt], ["abcd", "abzd"])
        for run in ("ddp", "fsdp")
    ]
    torch.testing.assert_close(scored[1], scored[0], atol=1e-5, rtol=0)
