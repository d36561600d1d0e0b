"""PPO and GRPO (issue 8, section 6): each formula against a hand-computed case, then the real
loop on a bandit with a known optimum (a one-token reply; reward 1 for a digit): both raise the
expected reward, ratios are 1 on the first pass over each rollout, the KL is 0 while the policy
is the reference; PPO with a trained reward model; and exact resume in the middle of a rollout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scratchlm.posttrain.grpo import group_advantages
from scratchlm.posttrain.ppo import gae, whiten
from scratchlm.posttrain.rl import clipped_surrogate, token_entropy, token_logps


def test_group_advantages_by_hand():
    adv, stats = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # unbiased, as TRL
    assert adv[:4].tolist() == pytest.approx([0.75 / (std + 1e-4), -0.25 / (std + 1e-4), -0.25 / (std + 1e-4),
                                              -0.25 / (std + 1e-4)], rel=1e-6)
    assert adv[4:].tolist() == [0.0] * 4  # every reply equally good: nothing to learn
    assert stats["frac_reward_zero_std"] == 0.5 and stats["reward"] == 0.625
    unscaled, _ = group_advantages(torch.tensor([1.0, 0.0]), 2, scale=False)
    assert unscaled.tolist() == [0.5, -0.5]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_gae_by_hand_and_with_lambda_1_it_is_reward_to_go_minus_value():
    # One reply of 3 tokens after a 1-token prompt (mask 0 1 1 1), then padding.
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, -0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0]])  # 9s: outside the reply, must not leak in
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    d3 = 1.0 - 0.3
    d2 = -0.2 + 0.3 - 0.4
    d1 = -0.1 + 0.4 - 0.5
    a3, a2 = d3, d2 + 0.95 * d3
    a1 = d1 + 0.95 * a2
    assert adv[0].tolist() == pytest.approx([0.0, a1, a2, a3, 0.0], rel=1e-6)
    assert ret[0, 1:4].tolist() == pytest.approx([a1 + 0.5, a2 + 0.4, a3 + 0.3], rel=1e-6)
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv1[0, 1:4].tolist() == pytest.approx([0.7 - 0.5, 0.8 - 0.4, 1.0 - 0.3], rel=1e-6)
    w = whiten(adv, mask)
    assert (w * mask).sum().item() == pytest.approx(0.0, abs=1e-5) and w[0, 0] == 0 and w[0, 4] == 0


def test_clipped_surrogate_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.2, 0.5]]))  # ratios 1.6, 0.4, 1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = clipped_surrogate(new, old, adv, mask, clip=0.2)
    # token 1: min(1.6, 1.2)·1 = 1.2 (clipped); token 2: min(0.4, 0.8)·1 = 0.4; token 3: 1·(−2)
    assert loss.item() == pytest.approx(-(1.2 + 0.4 - 2.0) / 3, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    same, stats = clipped_surrogate(old, old, adv, mask, clip=0.2)
    assert stats["ratio"].item() == 1.0 and stats["clipfrac"].item() == 0.0


def test_token_logps_and_entropy_match_log_softmax():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 7)
    y = torch.tensor([[1, 6, -1], [0, 2, 3]])
    logp = torch.log_softmax(z, -1)
    assert torch.allclose(token_logps(z, y)[:, :2], logp.gather(-1, y.clamp_min(0)[..., None])[..., 0][:, :2], atol=1e-6)
    assert torch.allclose(token_entropy(z), -(logp.exp() * logp).sum(-1), atol=1e-6)


# --- the real loop --------------------------------------------------------------------------

def _digit(prompt, text: str) -> float:
    """The bandit: one token, reward 1 for a digit (10 of the ~45 ids; the optimum is 1.0)."""
    return float(len(text) == 1 and text.isdigit())


@pytest.fixture(scope="module")
def bandit(task_base):
    path = task_base / "bandit.jsonl"
    with open(path, "w") as f:
        for i in range(120):
            f.write(json.dumps({"prompt": f"pick {i}=", "answer": "7"}) + "\n")
    return task_base, path


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rl_raises_the_bandit_reward_with_ratio_1_on_the_first_epoch_and_kl_0_at_the_start(bandit, tmp_path, method):
    from scratchlm.posttrain.grpo import grpo
    from scratchlm.posttrain.ppo import ppo

    root, prompts = bandit
    # Rollouts of 8 prompts x 4 replies = one micro-batch of 32; 2 epochs: steps alternate
    # first pass (policy = the one that sampled) and second pass.
    cfg = {"base": str(root / "base"), "data": str(prompts), "max_new_tokens": 1, "prompts_per_rollout": 8,
           "samples_per_prompt": 4, "epochs": 2, "kl_coef": 0.05}
    run = grpo if method == "grpo" else ppo
    summary = run(cfg, {"out_dir": str(tmp_path / method), "max_steps": 24, "eval_interval": 12, "lr": 3e-3,
                        "batch_size": 32, "sample_tokens": 0}, progress=False, reward_fn=_digit)
    assert summary["steps"] == 24
    steps = [r for r in _records(tmp_path / method) if "loss" in r]
    reward = "reward" if method == "grpo" else "objective/scores"
    ratio_dev = "ratio_max_deviation" if method == "grpo" else "policy/ratio_max_deviation"
    kl = "kl" if method == "grpo" else "objective/kl"
    first, second = [r for r in steps if r["epoch"] == 0], [r for r in steps if r["epoch"] == 1]
    assert len(first) == len(second) == 12
    # Ratios are 1 on the first epoch (the policy that sampled is the policy trained), not after.
    assert max(r[ratio_dev] for r in first) < 1e-5
    assert min(r[ratio_dev] for r in second) > 1e-4
    # The KL to the reference is 0 while the policy is the reference (the first rollout).
    assert steps[0][kl] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1][kl] > 1e-4
    # The expected reward rises toward the optimum (1.0) from the random model's ~0.2.
    start, end = steps[0][reward], sum(r[reward] for r in steps[-4:]) / 4
    assert start < 0.5 and end > start + 0.25, (start, end)
    if method == "ppo":
        assert steps[-1]["loss/value"] < steps[0]["loss/value"]
        assert (tmp_path / method / "last" / "value_head.safetensors").exists()
    assert (tmp_path / method / "last" / "rollouts.safetensors").exists()
    assert math.isfinite(summary["best_val_loss"])


def test_ppo_with_a_reward_model_and_exact_resume_mid_rollout(bandit, tmp_path):
    """A reward model trained on "no z" pairs pays PPO; 6 steps straight equal 3 + resume + 3
    (step 3 is in the middle of a rollout used for 4 epochs)."""
    import random

    from scratchlm.posttrain.ppo import ppo
    from scratchlm.posttrain.reward import train_reward_model

    root, prompts = bandit
    rng = random.Random(0)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for _ in range(200):
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxy") for _ in range(2))
            f.write(json.dumps({"prompt": f"pick {rng.randrange(120)}=", "chosen": word, "rejected": word[0] + "z"}) + "\n")
    train_reward_model({"base": str(root / "base"), "data": str(tmp_path / "pairs.jsonl")},
                       {"out_dir": str(tmp_path / "rm"), "max_steps": 40, "eval_interval": 40, "lr": 3e-3},
                       progress=False)
    with open(tmp_path / "bare.jsonl", "w") as f:  # PPO with a reward model needs no answers
        f.writelines(json.dumps({"prompt": f"pick {i}="}) + "\n" for i in range(60))
    cfg = {"base": str(root / "base"), "data": str(tmp_path / "bare.jsonl"), "reward_model": str(tmp_path / "rm" / "best"),
           "max_new_tokens": 3, "prompts_per_rollout": 8, "samples_per_prompt": 2, "epochs": 4}
    train = {"max_steps": 6, "eval_interval": 3, "lr": 1e-3, "batch_size": 16, "sample_tokens": 0}
    ppo(cfg, {**train, "out_dir": str(tmp_path / "straight")}, progress=False)
    ppo(cfg, {**train, "out_dir": str(tmp_path / "resumed"), "max_steps": 3}, progress=False)
    ppo(cfg, {**train, "out_dir": str(tmp_path / "resumed")}, progress=False, resume=True)
    keys = ("loss", "objective/scores", "objective/kl", "policy/ratio", "loss/value", "grad_norm")
    straight = [[r[k] for k in keys] for r in _records(tmp_path / "straight") if "loss" in r]
    resumed = [[r[k] for k in keys] for r in _records(tmp_path / "resumed") if "loss" in r]
    assert len(straight) == 6 and resumed == straight
    assert len({r[1] for r in straight}) == 2  # two rollouts (4 steps each), scored by the reward model
    evals = [r for r in _records(tmp_path / "straight") if "val_reward" in r]
    assert evals and all(math.isfinite(r["val_reward"]) for r in evals)


def test_rl_refuses_what_it_cannot_do(bandit, tmp_path):
    from scratchlm.config import ConfigError
    from scratchlm.posttrain.grpo import grpo

    root, prompts = bandit
    base = {"base": str(root / "base"), "data": str(prompts)}
    with pytest.raises(ValueError, match="must split into optimizer steps"):
        grpo({**base, "prompts_per_rollout": 3, "samples_per_prompt": 3}, {"out_dir": str(tmp_path / "a"),
                                                                              "batch_size": 4}, progress=False)
    with pytest.raises(ConfigError, match="grpo.temperature"):
        grpo({**base, "temperature": 0}, {"out_dir": str(tmp_path / "b")}, progress=False)
    with open(tmp_path / "bare.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "pick="}) + "\n")
    with pytest.raises(ValueError, match=r"bare\.jsonl, line 1: expected \{\"prompt\", \"answer\"\}"):
        grpo({**base, "data": str(tmp_path / "bare.jsonl")}, {"out_dir": str(tmp_path / "c")}, progress=False)
    with open(tmp_path / "odd.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "pick 1=", "answer": "1"}) + "\n" + json.dumps({"prompt": "pick §", "answer": "1"}))
    with pytest.raises(ValueError, match=r"odd\.jsonl, line 2: character '§'.*--skip-invalid"):
        grpo({**base, "data": str(tmp_path / "odd.jsonl"), "val_data": str(prompts)}, {"out_dir": str(tmp_path / "d")},
             progress=False)
