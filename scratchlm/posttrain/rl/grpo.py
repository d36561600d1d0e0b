"""GRPO: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath), with verifiable rewards.

PPO needs a value model to say what reward a prompt usually earns; GRPO asks the policy itself.
For each prompt it samples a *group* of G replies, scores each with a verifier (1 for the exact
answer, 0 otherwise: "RL from verifiable rewards", no reward model to fool), and uses the group
as the baseline::

    A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)        for every token of reply i

A reply better than its siblings is made likelier, a worse one less likely. A group whose
replies all earn the same reward (all right or all wrong) teaches nothing: its advantages are 0
(``frac_reward_zero_std`` counts those; a task too easy or too hard for the model shows up here
first). The loss is PPO's clipped surrogate on these advantages, plus optionally β·KL(π ‖ π_ref)
with the per-token estimator ``exp(ref − logp) − (ref − logp) − 1`` (≥ 0, unbiased, and 0 where
the policy equals the reference). Losses are averaged over all reply tokens of an optimizer step
(every micro-batch and rank), each token weighing the same.

Where this departs from the paper, on purpose:

1. **Token-level loss average.** DeepSeekMath averages each reply's token losses, then the replies
   (a token of a short reply weighs more than one of a long reply); here every reply token of an
   optimizer step weighs the same, across micro-batches and ranks (as DAPO, Yu et al., 2025, and
   Dr. GRPO do), so the result does not depend on how a rollout is split.
2. **Optional std scaling.** ``scale_rewards = false`` drops the division by the group's std
   (Dr. GRPO, Liu et al., 2025: it over-weights groups that are nearly all right or all wrong).
3. **Verifiable rewards by default.** The paper scores with a reward model; here a verifier (or
   any ``reward_fn``) pays 1 for the exact answer.

    scratchlm grpo --checkpoint runs/sft/best --data tasks/prompts-train.jsonl --out runs/grpo
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scratchlm.config import Rule
from scratchlm.posttrain.rl.losses import (
    clipped_surrogate,
    group_advantages,
    kl_k3,
    masked_mean,
    token_entropy,
    token_logps,
)
from scratchlm.posttrain.rl.trainer import RL_RULES, RLConfig, RLTrainer, rl_train_config
from scratchlm.train.metrics import Panel
from scratchlm.train.trainer import run_trainer


@dataclass
class GRPOConfig(RLConfig):
    samples_per_prompt: int = 8  # G, the group size
    kl_coef: float = 0.04  # β (DeepSeekMath's); 0 keeps no reference model at all
    scale_rewards: bool = True  # divide by the group's reward std (False: Dr. GRPO)

    SECTION: ClassVar[str] = "grpo"
    RULES: ClassVar[dict] = {
        **RL_RULES,
        "samples_per_prompt": Rule(min=2, why="a group needs 2 replies to compare"),
    }


class GRPOTrainer(RLTrainer):
    method = "grpo"
    plot_panels = (
        Panel("reward", (("reward", "rollouts (sampled)"), ("val_reward", "held out (greedy)")), "reward"),
        Panel("KL to the reference (nats/token)", (("kl", "per token (k3)"),), "KL"),
        Panel("GRPO loss", (("loss", "train"),), "loss"),
    )

    def _advantages(self, rewards, mask, old_logps, ref_logps, values):
        advantages, stats = group_advantages(
            rewards, self.settings.samples_per_prompt, self.settings.scale_rewards
        )
        zeros = torch.zeros_like(mask)
        return advantages[:, None] * mask, zeros, stats

    def _objective(self, logits, hidden, batch):
        _, y, mask, old_logps, ref_logps, advantages, _, _ = batch
        logps = token_logps(logits, y)
        losses, stats = clipped_surrogate(logps, old_logps, advantages, mask, self.settings.clip)
        if self.reference is not None:
            kl = kl_k3(logps, ref_logps, mask)
            losses = losses + self.settings.kl_coef * kl
        else:
            kl = torch.zeros_like(losses)
        with torch.no_grad():
            stats["kl"] = masked_mean(kl, mask)
            stats["entropy"] = masked_mean(token_entropy(logits), mask)
        return losses, {("clip_ratio" if k == "clipfrac" else k): v for k, v in stats.items()}


def grpo(
    grpo_config: dict,
    train_config: dict,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    reward_fn=None,
) -> dict:
    """GRPO from ``grpo_config["base"]`` (an SFT model) on prompts with answers."""
    gcfg = GRPOConfig.from_dict(grpo_config)
    cfg = rl_train_config(train_config)
    return run_trainer(
        lambda: GRPOTrainer(
            gcfg, cfg, reward_fn=reward_fn, resume=resume, progress=progress, overwrite=overwrite
        )
    )
