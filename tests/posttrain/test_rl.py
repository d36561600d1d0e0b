"""PPO and GRPO: each formula against a hand-computed case, then the real
loop on a bandit with a known optimum (a one-token reply; reward 1 for a digit): both raise the
expected reward, ratios are 1 on the first pass over each rollout, the KL is 0 while the policy
is the reference; PPO with a trained reward model; and exact resume in the middle of a rollout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scratchlm.posttrain.rl.losses import (
    clipped_surrogate,
    gae,
    group_advantages,
    token_entropy,
    token_logps,
    whiten,
)


def test_group_advantages_by_hand():
    adv, stats = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # unbiased, as TRL
    assert adv[:4].tolist() == pytest.approx(
        [0.75 / (std + 1e-4), -0.25 / (std + 1e-4), -0.25 / (std + 1e-4), -0.25 / (std + 1e-4)], rel=1e-6
    )
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
    losses, stats = clipped_surrogate(new, old, adv, mask, clip=0.2)
    # token 1: min(1.6, 1.2)·1 = 1.2 (clipped); token 2: min(0.4, 0.8)·1 = 0.4; token 3: 1·(−2)
    assert losses[0].tolist() == pytest.approx([-1.2, -0.4, 2.0], rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    same, stats = clipped_surrogate(old, old, adv, mask, clip=0.2)
    assert stats["ratio"].item() == 1.0 and stats["clipfrac"].item() == 0.0


def test_ppo_rewards_score_at_the_last_token_and_pay_kl_on_every_token():
    """PPO's per-token rewards by hand on a 3-token reply: −β·(log π_old − log π_ref) on each
    token, the score on the last; with γ = λ = 1 and zero values the advantage is reward-to-go."""
    from types import SimpleNamespace

    from scratchlm.posttrain.rl.ppo import PPOConfig, PPOTrainer

    me = SimpleNamespace(
        settings=PPOConfig(base="b", data="d", kl_coef=0.1, lam=1.0, whiten_advantages=False)
    )
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, -1.0, -2.0, -1.0, 0.0]])
    ref = torch.tensor(
        [[0.0, -1.5, -2.0, -1.5, 0.0]]
    )  # the policy is likelier than the reference: KL 0.5 + 0 + 0.5
    adv, ret, stats = PPOTrainer._advantages(me, torch.tensor([2.0]), mask, old, ref, torch.zeros(1, 5))
    assert adv[0].tolist() == pytest.approx([0.0, 1.9, 1.95, 1.95, 0.0], rel=1e-6)
    assert ret[0].tolist() == pytest.approx(adv[0].tolist())
    assert stats["objective/kl"] == pytest.approx(1.0) and stats["objective/rlhf_reward"] == pytest.approx(
        1.9
    )


def test_grpo_k3_kl_by_hand_and_finite_beyond_the_reply():
    from types import SimpleNamespace

    from scratchlm.posttrain.rl.grpo import GRPOConfig, GRPOTrainer

    me = SimpleNamespace(settings=GRPOConfig(base="b", data="d", kl_coef=1.0), reference=object())
    logits = torch.zeros(1, 3, 4)
    logits[0, 2, 0] = -200.0  # padding position: log p(id 0) = −200, exp(ref − logp) would overflow there
    y = torch.tensor([[1, 2, -1]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.log_softmax(logits, -1)[0, :2].gather(-1, y[0, :2, None])[:, 0]
    ref = torch.cat([logp - 1.0, torch.zeros(1)])[
        None
    ]  # the reference finds each reply token e times less likely
    zeros = torch.zeros(1, 3)
    batch = (None, y, mask, torch.cat([logp, torch.zeros(1)])[None], ref, zeros, zeros, zeros)
    losses, stats = GRPOTrainer._objective(me, logits, None, batch)
    k3 = math.exp(-1.0) + 1.0 - 1.0  # exp(d) − d − 1 with d = log π_ref − log π = −1
    assert torch.isfinite(losses).all() and stats["kl"].item() == pytest.approx(k3, rel=1e-5)
    assert losses[0].tolist() == pytest.approx([k3, k3, 0.0], rel=1e-5)  # advantage 0: the KL term alone


def test_token_logps_and_entropy_match_log_softmax():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 7)
    y = torch.tensor([[1, 6, -1], [0, 2, 3]])
    logp = torch.log_softmax(z, -1)
    assert torch.allclose(
        token_logps(z, y)[:, :2], logp.gather(-1, y.clamp_min(0)[..., None])[..., 0][:, :2], atol=1e-6
    )
    assert torch.allclose(token_entropy(z), -(logp.exp() * logp).sum(-1), atol=1e-6)


def test_the_engine_copy_is_written_whole_or_the_difference_is_named():
    """Under FSDP the engine samples from a plain copy of the policy: every parameter and buffer
    of the copy is written from the policy (PPO's value head is the policy's only extra), and a
    copy that differs from the policy fails, naming what differs."""
    import copy
    from types import SimpleNamespace

    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.posttrain.reward import add_scalar_head
    from scratchlm.posttrain.rl.trainer import RLTrainer

    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=8, block_size=8, norm="layernorm"))
    engine_copy = copy.deepcopy(policy)
    add_scalar_head(policy, "value_head")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    me = SimpleNamespace(model=policy, rollout_policy=engine_copy)
    RLTrainer._gather_policy(me)
    written = engine_copy.state_dict()
    for k, v in policy.state_dict().items():
        assert k.startswith("value_head.") or torch.equal(written[k], v), k
    engine_copy.register_buffer("stale", torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"the copy's \['stale'\] were not written"):
        RLTrainer._gather_policy(me)
    del engine_copy.stale
    policy.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(RuntimeError, match=r"the policy's \['extra'\] have no place in the copy"):
        RLTrainer._gather_policy(me)


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
def test_rl_raises_the_bandit_reward_with_ratio_1_on_the_first_epoch_and_kl_0_at_the_start(
    bandit, tmp_path, method
):
    from scratchlm.posttrain.rl.grpo import grpo
    from scratchlm.posttrain.rl.ppo import ppo

    root, prompts = bandit
    # Rollouts of 8 prompts x 4 replies = one micro-batch of 32; 2 epochs: steps alternate
    # first pass (policy = the one that sampled) and second pass.
    cfg = {
        "base": str(root / "base"),
        "data": str(prompts),
        "max_new_tokens": 1,
        "prompts_per_rollout": 8,
        "samples_per_prompt": 4,
        "epochs": 2,
        "kl_coef": 0.05,
    }
    run = grpo if method == "grpo" else ppo
    summary = run(
        cfg,
        {
            "out_dir": str(tmp_path / method),
            "max_steps": 24,
            "eval_interval": 12,
            "lr": 3e-3,
            "batch_size": 32,
            "sample_tokens": 0,
        },
        progress=False,
        reward_fn=_digit,
    )
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
        assert steps[-1]["loss/value_avg"] < steps[0]["loss/value_avg"]
        assert (tmp_path / method / "last" / "value_head.safetensors").exists()
    assert (tmp_path / method / "last" / "rollouts.safetensors").exists()
    assert math.isfinite(summary["best_val_loss"])


def test_ppo_with_a_reward_model_and_exact_resume_mid_rollout(bandit, tmp_path):
    """A reward model trained on "no z" pairs pays PPO; 6 steps straight equal 3 + resume + 3
    (step 3 is in the middle of a rollout used for 4 epochs)."""
    import random

    from scratchlm.posttrain.reward import train_reward_model
    from scratchlm.posttrain.rl.ppo import ppo

    root, prompts = bandit
    rng = random.Random(0)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for _ in range(200):
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxy") for _ in range(2))
            f.write(
                json.dumps(
                    {"prompt": f"pick {rng.randrange(120)}=", "chosen": word, "rejected": word[0] + "z"}
                )
                + "\n"
            )
    train_reward_model(
        {"base": str(root / "base"), "data": str(tmp_path / "pairs.jsonl")},
        {"out_dir": str(tmp_path / "rm"), "max_steps": 40, "eval_interval": 40, "lr": 3e-3},
        progress=False,
    )
    with open(tmp_path / "bare.jsonl", "w") as f:  # PPO with a reward model needs no answers
        f.writelines(json.dumps({"prompt": f"pick {i}="}) + "\n" for i in range(60))
    cfg = {
        "base": str(root / "base"),
        "data": str(tmp_path / "bare.jsonl"),
        "reward_model": str(tmp_path / "rm" / "best"),
        "max_new_tokens": 3,
        "prompts_per_rollout": 8,
        "samples_per_prompt": 2,
        "epochs": 4,
    }
    train = {"max_steps": 6, "eval_interval": 3, "lr": 1e-3, "batch_size": 16, "sample_tokens": 0}
    ppo(cfg, {**train, "out_dir": str(tmp_path / "straight")}, progress=False)
    ppo(cfg, {**train, "out_dir": str(tmp_path / "resumed"), "max_steps": 3}, progress=False)
    ppo(cfg, {**train, "out_dir": str(tmp_path / "resumed")}, progress=False, resume=True)
    keys = ("loss", "objective/scores", "objective/kl", "val/ratio", "loss/value_avg", "grad_norm")
    straight = [[r[k] for k in keys] for r in _records(tmp_path / "straight") if "loss" in r]
    resumed = [[r[k] for k in keys] for r in _records(tmp_path / "resumed") if "loss" in r]
    assert len(straight) == 6 and resumed == straight
    assert len({r[1] for r in straight}) == 2  # two rollouts (4 steps each), scored by the reward model
    evals = [r for r in _records(tmp_path / "straight") if "val_reward" in r]
    assert evals and all(math.isfinite(r["val_reward"]) for r in evals)


def test_rl_refuses_what_it_cannot_do(bandit, tmp_path):
    from scratchlm.config import ConfigError
    from scratchlm.posttrain.rl.grpo import grpo

    root, prompts = bandit
    base = {"base": str(root / "base"), "data": str(prompts)}
    with pytest.raises(ValueError, match="must split into optimizer steps"):
        grpo(
            {**base, "prompts_per_rollout": 3, "samples_per_prompt": 3},
            {"out_dir": str(tmp_path / "a"), "batch_size": 4},
            progress=False,
        )
    with pytest.raises(ConfigError, match="grpo.temperature"):
        grpo({**base, "temperature": 0}, {"out_dir": str(tmp_path / "b")}, progress=False)
    with open(tmp_path / "bare.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "pick="}) + "\n")
    with pytest.raises(ValueError, match=r"bare\.jsonl, line 1: expected \{\"prompt\", \"answer\"\}"):
        grpo({**base, "data": str(tmp_path / "bare.jsonl")}, {"out_dir": str(tmp_path / "c")}, progress=False)
    with open(tmp_path / "odd.jsonl", "w") as f:
        f.write(
            json.dumps({"prompt": "pick 1=", "answer": "1"})
            + "\n"
            + json.dumps({"prompt": "pick §", "answer": "1"})
        )
    with pytest.raises(ValueError, match=r"odd\.jsonl, line 2: character '§'.*--skip-invalid"):
        grpo(
            {**base, "data": str(tmp_path / "odd.jsonl"), "val_data": str(prompts)},
            {"out_dir": str(tmp_path / "d")},
            progress=False,
        )


def test_grpo_and_ppo_commands_report_and_resume(bandit, tmp_path, capsys):
    from scratchlm.cli import main

    root, prompts = bandit
    for method in ("grpo", "ppo"):
        out = tmp_path / method
        args = [
            method,
            "--checkpoint",
            str(root / "base"),
            "--data",
            str(prompts),
            "--out",
            str(out),
            "--json",
            "--set",
            f"{method}.prompts_per_rollout=4",
            "--set",
            f"{method}.samples_per_prompt=4",
            "--set",
            f"{method}.max_new_tokens=2",
            "--set",
            "train.batch_size=16",
            "--set",
            "train.eval_interval=2",
            "--set",
            "train.sample_tokens=0",
        ]
        assert main(args + ["--set", "train.max_steps=2"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["steps"] == 2 and {
            "val_reward",
            "val_exact_match",
            "val_ended_with_end_of_turn",
        } <= set(report["eval"][-1])
        assert main(args + ["--set", "train.max_steps=4", "--resume"]) == 0
        assert json.loads(capsys.readouterr().out)["steps"] == 4
        # The policy checkpoint is an ordinary GPT checkpoint with the chat tokenizer.
        from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint

        model, state = load_model_from_checkpoint(out / "last")
        assert (
            state["method"] == method
            and "<|im_end|>" in load_checkpoint_tokenizer(out / "last", state).special_tokens
        )


def test_ratio_is_1_on_the_first_epoch_with_dropout_in_the_model(tmp_path):
    """A base trained with dropout 0.1: RL switches every dropout off (attention's too), or the
    policy that sampled and the policy trained would differ by a random mask."""
    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.posttrain.rl.grpo import grpo
    from scratchlm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz", ["<|endoftext|>"])
    torch.manual_seed(0)
    base = GPT(
        GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=40, dropout=0.1)
    )
    save_model_only(tmp_path / "base", base, tokenizer=tok)
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"pick {i}=", "answer": "7"}) + "\n" for i in range(40))
    grpo(
        {
            "base": str(tmp_path / "base"),
            "data": str(tmp_path / "p.jsonl"),
            "max_new_tokens": 3,
            "prompts_per_rollout": 4,
            "samples_per_prompt": 4,
            "epochs": 2,
        },
        {
            "out_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "eval_interval": 4,
            "batch_size": 16,
            "lr": 1e-2,
            "sample_tokens": 0,
        },
        progress=False,
        reward_fn=lambda p, t: float(t[:1].isdigit()),
    )
    steps = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert all(r["ratio_max_deviation"] < 1e-5 for r in steps if r["epoch"] == 0)
    assert any(r["ratio_max_deviation"] > 1e-4 for r in steps if r["epoch"] == 1)


def test_the_step_objective_does_not_depend_on_the_micro_batch_split(bandit, tmp_path):
    """16 replies per step as one micro-batch of 16 or two of 8 (grad_accum 2): every reply token
    weighs the same either way, so the losses and gradient norms agree."""
    from scratchlm.posttrain.rl.grpo import grpo

    root, prompts = bandit
    cfg = {
        "base": str(root / "base"),
        "data": str(prompts),
        "max_new_tokens": 3,
        "prompts_per_rollout": 4,
        "samples_per_prompt": 4,
        "epochs": 2,
    }
    runs = {}
    for name, split in (("one", {"batch_size": 16}), ("two", {"batch_size": 8, "grad_accum": 2})):
        grpo(
            cfg,
            {
                "out_dir": str(tmp_path / name),
                "max_steps": 4,
                "eval_interval": 4,
                "lr": 1e-3,
                "sample_tokens": 0,
                **split,
            },
            progress=False,
            reward_fn=lambda p, t: float(t[:1].isdigit()),
        )
        runs[name] = [(r["loss"], r["grad_norm"]) for r in _records(tmp_path / name) if "loss" in r]
    assert len(runs["one"]) == 4
    for (a, ga), (b, gb) in zip(runs["one"], runs["two"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6) and ga == pytest.approx(gb, rel=1e-4)


DIST_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
RANK = int(os.environ["RANK"])
from scratchlm.posttrain.rl.grpo import grpo
from scratchlm.posttrain.rl.ppo import ppo
from scratchlm.posttrain.reward import train_reward_model

def reward(prompt, text):
    if {fail_on_rank} == RANK:
        raise RuntimeError("this reward function failed on rank " + str(RANK))
    return float(text[:1].isdigit())

run = {{"grpo": grpo, "ppo": ppo, "rm": train_reward_model}}[{method!r}]
extra = {{"reward_fn": reward}} if {method!r} != "rm" else {{}}
summary = run({cfg}, {train}, progress=False, resume={resume}, **extra)
with open(os.path.join({out!r}, f"rank{{RANK}}.json"), "w") as f:
    json.dump(summary, f)
"""


def _torchrun(tmp_path, name: str, method: str, cfg: dict, train: dict, resume=False, fail_on_rank=-1):
    from processes import REPO, torchrun

    out = tmp_path / f"summaries-{name}"
    out.mkdir()
    script = tmp_path / f"dist-{name}.py"
    script.write_text(
        DIST_SCRIPT.format(
            repo=str(REPO),
            method=method,
            cfg=repr(cfg),
            train=repr(train),
            resume=resume,
            fail_on_rank=fail_on_rank,
            out=str(out),
        )
    )
    result = torchrun(script, timeout=240)
    return result, [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow  # ~27 s (63 s on busy cores): five two-rank launches
def test_rl_and_reward_model_on_two_ranks(bandit, tmp_path):
    """Two gloo ranks: GRPO resumes exactly mid-rollout (each rank its own prompts and rollout,
    both kept in the checkpoint); a reward function that fails on one rank stops both, with the
    reason, instead of leaving the other waiting; a reward model with untied embeddings trains."""
    root, prompts = bandit
    cfg = {
        "base": str(root / "base"),
        "data": str(prompts),
        "max_new_tokens": 2,
        "prompts_per_rollout": 4,
        "samples_per_prompt": 4,
        "epochs": 2,
    }
    train = {"max_steps": 4, "eval_interval": 3, "lr": 3e-3, "batch_size": 8, "sample_tokens": 0}
    result, straight = _torchrun(
        tmp_path, "straight", "grpo", cfg, {**train, "out_dir": str(tmp_path / "straight")}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(straight) == 2 and straight[0]["world_size"] == 2 and straight[0]["steps"] == 4
    result, _ = _torchrun(
        tmp_path,
        "resumed-first",
        "grpo",
        cfg,
        {**train, "out_dir": str(tmp_path / "resumed"), "max_steps": 3},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result, _ = _torchrun(
        tmp_path, "resumed-second", "grpo", cfg, {**train, "out_dir": str(tmp_path / "resumed")}, resume=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {
        name: [(r["loss"], r["grad_norm"], r["reward"]) for r in _records(tmp_path / name) if "loss" in r]
        for name in ("straight", "resumed")
    }
    assert len(losses["straight"]) == 4 and losses["resumed"] == losses["straight"]

    result, _ = _torchrun(
        tmp_path, "failing", "ppo", cfg, {**train, "out_dir": str(tmp_path / "failing")}, fail_on_rank=1
    )
    assert result.returncode != 0
    assert "rank 1 stopped the run, a rollout failed" in result.stderr and "failed on rank 1" in result.stderr

    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, read_state, save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    tok = load_checkpoint_tokenizer(root / "base", read_state(root / "base"))
    torch.manual_seed(0)
    untied = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=48, tie_embeddings=False
        )
    )
    save_model_only(tmp_path / "untied", untied, tokenizer=tok)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(
            json.dumps({"prompt": f"pick {i}=", "chosen": "ab", "rejected": "az"}) + "\n" for i in range(40)
        )
    result, summaries = _torchrun(
        tmp_path,
        "rm",
        "rm",
        {"base": str(tmp_path / "untied"), "data": str(tmp_path / "pairs.jsonl")},
        {"out_dir": str(tmp_path / "rm"), "max_steps": 3, "eval_interval": 3, "batch_size": 4},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert summaries[0]["steps"] == 3


FSDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
RANK = int(os.environ["RANK"])
import scratchlm.posttrain.rl.trainer as rl
import scratchlm.serve.chat as chat
from scratchlm.posttrain.rl.grpo import grpo
from scratchlm.posttrain.rl.ppo import ppo

# The weights of every model the engine samples from (rollouts, evaluations), as one checksum:
# under DDP the policy itself, under FSDP its plain copy, which must hold the same weights.
real_generate, engine_weights = chat.generate_replies, []
def generate_replies(model, *args, **kwargs):
    engine_weights.append(sum(p.double().sum().item() for n, p in model.named_parameters()
                              if not n.startswith("value_head.")))
    return real_generate(model, *args, **kwargs)
chat.generate_replies = generate_replies

# After each rollout's log-probs: the reference's parameters that are not shards (none, under FSDP).
from torch.distributed.tensor import DTensor
real_logps, reference_whole = rl.RLTrainer._rollout_logps, []
def _rollout_logps(self, *args):
    out = real_logps(self, *args)
    if self.sharded and self.reference is not None:
        reference_whole.append([n for n, p in self.reference.named_parameters() if not isinstance(p, DTensor)])
    return out
rl.RLTrainer._rollout_logps = _rollout_logps

def reward(prompt, text):
    if {fail_on_rank} == RANK:
        raise RuntimeError("this reward function failed on rank " + str(RANK))
    return float(text[:1].isdigit())

method, cfg, train, resume, snapshot = {job!r}
if snapshot:  # a copy of the step-3 checkpoint, which a resumed run starts from
    import shutil
    from scratchlm.train.checkpoint import CheckpointStore
    real_save = CheckpointStore.save
    def save(self, names, weights, optimizer_state, state, **kwargs):
        target = real_save(self, names, weights, optimizer_state, state, **kwargs)
        if state["step"] == 3:
            shutil.copytree(target, snapshot)
        return target
    CheckpointStore.save = save
summary = {{"grpo": grpo, "ppo": ppo}}[method](cfg, train, progress=False, resume=resume, reward_fn=reward)
with open(os.path.join(train["out_dir"], f"rank{{RANK}}-{{int(resume)}}.json"), "w") as f:
    json.dump({{**summary, "engine_weights": engine_weights, "reference_whole": reference_whole}}, f)
"""


def _torchrun_job(tmp_path, index: int, job: tuple, fail_on_rank: int = -1):
    """One run (method, cfg, train, resume, snapshot) on 2 gloo ranks; ``snapshot``, a folder or None,
    receives a copy of the run's step-3 checkpoint. One launch per run: a process that leaves the
    group and joins a new one under the same torchrun can hang in the rendezvous."""
    from processes import REPO, torchrun

    script = tmp_path / f"fsdp-{index}.py"
    script.write_text(FSDP_SCRIPT.format(repo=str(REPO), job=job, fail_on_rank=fail_on_rank))
    return torchrun(script, timeout=240)


@pytest.mark.slow  # ~42 s (up to 105 s on busy cores): seven two-rank launches
def test_grpo_and_ppo_under_fsdp_equal_ddp_and_resume_exactly(task_base, tmp_path):
    """Two gloo ranks, train.strategy = "fsdp": GRPO and PPO (value head, KL reference, grad_accum 2
    for PPO) over two rollouts equal the same runs under DDP (weights within 1e-6, the same
    rewards, losses within 1e-5); the engine samples from a copy holding the policy's current
    weights at every rollout and evaluation (the checksum DDP's policy has); the frozen reference
    is all shards again after each rollout's log-probs (its root too); the ranks' rollouts have
    different lengths and still train in lockstep; resumed from the FSDP run's own step-3
    checkpoint (mid-rollout), GRPO and PPO reach its steps 4-6 and its weights bit for bit; a
    reward function failing on one rank stops both with the reason, no hang."""
    import os
    import shutil
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    # Prompts of very different lengths: each rank's rollout is padded to its own longest row.
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(
            json.dumps({"prompt": f"pick {'x' * (i % 17)}{i}=", "answer": "7"}) + "\n" for i in range(60)
        )
    cfg = {
        "base": str(task_base / "base"),
        "data": str(tmp_path / "prompts.jsonl"),
        "max_new_tokens": 3,
        "prompts_per_rollout": 4,
        "samples_per_prompt": 4,
        "epochs": 2,
    }
    # 16 replies per rank, 8 per step: 4 steps per rollout; steps 5-6 train on a second rollout
    # sampled from the trained policy; the checkpoint at step 3 falls mid-rollout.
    train = {"max_steps": 6, "eval_interval": 3, "lr": 3e-3, "batch_size": 8, "sample_tokens": 0}
    split = {"grpo": {}, "ppo": {"batch_size": 4, "grad_accum": 2}}
    jobs = []
    for method in ("grpo", "ppo"):
        settings = {**train, **split[method]}
        jobs += [
            (method, cfg, {**settings, "out_dir": str(tmp_path / f"{method}-ddp")}, False, None),
            (
                method,
                cfg,
                {**settings, "strategy": "fsdp", "out_dir": str(tmp_path / f"{method}-fsdp")},
                False,
                str(tmp_path / f"{method}-step-3"),
            ),
        ]
    # Resume (PPO: the value head, its optimizer state and the reference come back too) from the
    # FSDP run's step-3 checkpoint: the straight run's first half is the resumed run's.
    jobs += [
        (
            method,
            cfg,
            {**train, **split[method], "strategy": "fsdp", "out_dir": str(tmp_path / f"{method}-resumed")},
            True,
            None,
        )
        for method in ("grpo", "ppo")
    ]
    for index, job in enumerate(jobs):
        if job[3]:
            resumed = Path(job[2]["out_dir"])
            shutil.copytree(tmp_path / f"{job[0]}-step-3", resumed / "checkpoints" / "step-00000003")
            os.symlink("checkpoints/step-00000003", resumed / "last")
        result = _torchrun_job(tmp_path, index, job)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "/fsdp/" not in result.stderr, result.stderr[
            -3000:
        ]  # no warning from FSDP (a head returning a view)

    for method in ("grpo", "ppo"):
        ddp, fsdp, resumed = (tmp_path / f"{method}-{run}" for run in ("ddp", "fsdp", "resumed"))
        files = ["model.safetensors"] + (["value_head.safetensors"] if method == "ppo" else [])
        for name in files:
            a, b, c = (load_file(str(run / "last" / name)) for run in (ddp, fsdp, resumed))
            assert a.keys() == b.keys() == c.keys()
            for k in a:
                torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)  # FSDP = DDP
                assert torch.equal(c[k], b[k]), (method, name, k)  # resumed = straight, bit for bit
        if method == "ppo":
            assert a["weight"].shape == (1, 64) and a["weight"].abs().sum() > 0  # whole, and trained

        reward, ratio_dev, kl = (
            ("reward", "ratio_max_deviation", "kl")
            if method == "grpo"
            else ("objective/scores", "policy/ratio_max_deviation", "objective/kl")
        )
        steps = {run.name: [r for r in _records(run) if "loss" in r] for run in (ddp, fsdp, resumed)}
        assert len(steps[fsdp.name]) == 6
        for a, b in zip(steps[ddp.name], steps[fsdp.name]):
            assert b[reward] == a[reward] and 0 <= b[reward] <= 1  # the same replies sampled
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and math.isfinite(b["loss"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        keys = ("step", "loss", "grad_norm", reward, kl, ratio_dev)
        assert [[r[k] for k in keys] for r in steps[resumed.name]] == [
            [r[k] for k in keys] for r in steps[fsdp.name] if r["step"] > 3
        ]
        assert len(steps[resumed.name]) == 3
        first = steps[fsdp.name]
        # The first step on each rollout: the log-probs taken at rollout time (no grad, eval mode)
        # are the training forward's (ratio 1); one optimizer step later they are not.
        assert first[0][ratio_dev] < 1e-5 and first[4][ratio_dev] < 1e-5 and first[1][ratio_dev] > 1e-4
        assert first[0][kl] == pytest.approx(0.0, abs=1e-6) and first[-1][kl] > 0
        evals = {
            run.name: [r["val_reward"] for r in _records(run) if "val_reward" in r] for run in (ddp, fsdp)
        }
        assert len(evals[fsdp.name]) == 2 and evals[fsdp.name] == evals[ddp.name]

        for rank in (0, 1):
            seen = {run.name: json.loads((run / f"rank{rank}-0.json").read_text()) for run in (ddp, fsdp)}
            # The engine's weights at each rollout (2 per rank) and evaluation (2, rank 0): the policy's.
            weights = {name: summary["engine_weights"] for name, summary in seen.items()}
            assert len(weights[fsdp.name]) == (4 if rank == 0 else 2)
            assert weights[fsdp.name] == pytest.approx(weights[ddp.name], rel=1e-6, abs=1e-3)
            assert len(set(weights[fsdp.name])) == len(
                weights[fsdp.name]
            )  # a fresh copy each time, not the base
            # After each of the 2 rollouts' log-probs, no parameter of the reference is whole.
            assert seen[fsdp.name]["reference_whole"] == [[], []]

        # The two ranks' rollouts (kept in the checkpoint) were padded to different lengths.
        with safe_open(str(tmp_path / f"{method}-step-3" / "rollouts.safetensors"), "pt") as f:
            lengths = {f.get_slice("rank0.x").get_shape()[1], f.get_slice("rank1.x").get_shape()[1]}
        assert len(lengths) == 2, lengths

    bad = ("ppo", cfg, {**train, "strategy": "fsdp", "out_dir": str(tmp_path / "failing")}, False, None)
    result = _torchrun_job(tmp_path, len(jobs), bad, fail_on_rank=1)
    assert result.returncode != 0
    assert "rank 1 stopped the run, a rollout failed" in result.stderr and "failed on rank 1" in result.stderr
