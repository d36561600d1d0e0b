"""PPO for language models, as in InstructGPT (Ouyang et al., 2022) and "The N+ implementation
details of RLHF with PPO" (Huang et al., 2024).

Each reply is an episode; each generated token an action. The environment pays at the end: the
reward model's score of the whole reply (or a verifier's 0/1). On the way, each token pays a
KL penalty for straying from the reference (the SFT model)::

    r_t = −β · (log π_old(a_t) − log π_ref(a_t))         (+ score at the reply's last token)

A **value head** (a scalar on the policy's own final hidden state) learns to predict the return
from each position; **GAE** (Schulman et al., 2016; :func:`~scratchlm.posttrain.rl.losses.gae`)
turns rewards and values into advantages with a bias–variance knob λ (0.95)::

    δ_t = r_t + γ·V(t+1) − V(t),      A_t = δ_t + γλ·A_{t+1}       (γ = 1: the episode is short)

Advantages are whitened over the rollout (rewards mean nothing on their own, see
:mod:`scratchlm.posttrain.reward`), the value head's target is ``A_t + V(t)``. The loss of a
micro-batch is the clipped policy loss plus ``vf_coef`` × the value loss, itself clipped around
the rollout-time values (a value estimate cannot jump further than ``value_clip`` per rollout)::

    loss = mean_t max(−A·ratio, −A·clip(ratio, 1±ε)) + vf_coef · ½ mean_t max((V − R)², (V_clipped − R)²)

Where this departs from InstructGPT, on purpose:

1. **One network.** The value head sits on the policy's own trunk (its loss weighted by
   ``vf_coef``) instead of a separate value model started from the reward model: half the memory,
   at the price of the two objectives sharing features.
2. **Token-level loss average.** Every reply token of an optimizer step weighs the same, across
   micro-batches and ranks, whatever the split.
3. **No pretraining mix** (InstructGPT's PPO-ptx term), and a verifier may stand in for the reward model.

Metrics as TRL names them: ``objective/scores``, ``objective/kl``, ``objective/rlhf_reward``,
``policy/entropy_avg``, ``policy/clipfrac_avg``, ``policy/approxkl_avg``, ``val/ratio``,
``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg`` (per step: the last micro-batch's).

    scratchlm ppo --checkpoint runs/sft/best --reward-model runs/rm/best --data prompts.jsonl --out runs/ppo
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from scratchlm.config import Rule
from scratchlm.posttrain.rl.losses import (
    clipped_surrogate,
    gae,
    kl_k1,
    masked_mean,
    token_entropy,
    token_logps,
    whiten,
)
from scratchlm.posttrain.rl.trainer import RL_RULES, RLConfig, RLTrainer, rl_train_config
from scratchlm.train.metrics import Panel
from scratchlm.train.trainer import run_trainer


@dataclass
class PPOConfig(RLConfig):
    # a `scratchlm reward-model` checkpoint; None: the prompts' answers verify
    reward_model: str | None = None
    epochs: int = 4  # PPO epochs per rollout
    gamma: float = 1.0
    lam: float = 0.95  # GAE's λ
    vf_coef: float = 0.1
    value_clip: float = 0.2
    whiten_advantages: bool = True

    SECTION: ClassVar[str] = "ppo"
    RULES: ClassVar[dict] = {
        **RL_RULES,
        "gamma": Rule(min=0, max=1),
        "lam": Rule(min=0, max=1),
        "vf_coef": Rule(min=0),
        "value_clip": Rule(above=0),
    }


class PPOTrainer(RLTrainer):
    method = "ppo"
    plot_panels = (
        Panel(
            "reward",
            (("objective/scores", "rollouts (sampled)"), ("val_reward", "held out (greedy)")),
            "reward",
        ),
        Panel("KL to the reference (nats/reply)", (("objective/kl", "per reply"),), "KL"),
        Panel("PPO loss", (("loss", "train"),), "loss"),
    )
    has_value_head = True

    def __init__(self, config: PPOConfig, train_config, *, reward_fn=None, **kwargs):
        if reward_fn is not None and config.reward_model is not None:
            raise ValueError("give ppo.reward_model or a reward function, not both")
        if config.reward_model is not None:  # `runs/rm/best` -> the step folder it names now
            config.reward_model = str(Path(config.reward_model).resolve())
        super().__init__(config, train_config, reward_fn=reward_fn, **kwargs)

    @property
    def needs_answers(self) -> bool:
        return self.reward_fn is None and self.settings.reward_model is None

    @property
    def reply_reserve(self) -> int:
        """A reward model reads a cut reply closed by one more token, <|im_end|>: keep room for it."""
        return 1 if self.settings.reward_model else 0

    def _prepare_data(self, model_section: dict) -> None:
        super()._prepare_data(model_section)
        self.reward_model, self.reward_model_sha256 = None, None
        if self.settings.reward_model is None:
            return
        from scratchlm.models.checkpoint import read_state
        from scratchlm.posttrain.reward import HEAD_FILE, load_reward_model

        # Loaded and checked before training starts, on every rank (a rank that cannot read it
        # stops them all here, not in a rollout).
        def load():
            rm = load_reward_model(self.settings.reward_model, device=self.device)
            if rm.tokenizer.fingerprint != self.tokenizer.fingerprint:
                raise ValueError(
                    f"the reward model {self.settings.reward_model} reads another tokenizer than the policy: "
                    "train it from the same base (or SFT model) as the policy"
                )
            if rm.model.config.block_size < self.model_config.block_size:
                raise ValueError(
                    f"the reward model's context ({rm.model.config.block_size}) is shorter than the "
                    f"policy's ({self.model_config.block_size}): it could not read every reply"
                )
            return rm

        self.reward_model = self._on_every_rank_then_agree(load, "the reward model cannot be used")
        files = read_state(self.settings.reward_model)["files"]  # the network and its head, both pinned
        self.reward_model_sha256 = "+".join(
            files[name]["sha256"] for name in ("model.safetensors", HEAD_FILE)
        )

    def _check_resumable(self) -> dict:
        state = super()._check_resumable()
        recorded = (state.get(self.method) or {}).get("reward_model_sha256")
        if recorded != self.reward_model_sha256:
            raise ValueError(
                f"the reward model {self.settings.reward_model} is not the one this run started with (its "
                "weights' sha256 differs): resume with the same --reward-model"
            )
        return state

    def _state_dict(self, rng_by_rank: list[dict]) -> dict:
        state = super()._state_dict(rng_by_rank)
        state[self.method]["reward_model_sha256"] = self.reward_model_sha256
        return state

    def _rewards(self, prompts, texts, ids):
        if self.reward_model is None:
            return super()._rewards(prompts, texts, ids)
        # The reward model reads the very ids the policy sampled (a reply may hold a special token
        # that no text could be rendered back into), closed by <|im_end|> as in its training pairs.
        end = self.template.end_id
        return self.reward_model.score_ids([row if row[-1] == end else row + [end] for row in ids])

    def _advantages(self, rewards, mask, old_logps, ref_logps, values):
        rl = self.settings
        kl = kl_k1(old_logps, ref_logps, mask)
        per_token = -rl.kl_coef * kl
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(
            dim=-1
        )  # each reply's final token
        per_token[torch.arange(mask.shape[0], device=mask.device), last] += rewards
        advantages, returns = gae(per_token, values, mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            advantages = whiten(advantages, mask)
        kl_sum = kl.sum(-1)
        stats = {
            "objective/scores": rewards.mean().item(),
            "objective/kl": kl_sum.mean().item(),
            "objective/rlhf_reward": (rewards - rl.kl_coef * kl_sum).mean().item(),
        }
        return advantages, returns, stats

    def _objective(self, logits, hidden, batch):
        _, y, mask, old_logps, _, advantages, returns, old_values = batch
        logps = token_logps(logits, y)
        policy_losses, stats = clipped_surrogate(logps, old_logps, advantages, mask, self.settings.clip)
        values = self._value(hidden)
        clipped = old_values + torch.clamp(
            values - old_values, -self.settings.value_clip, self.settings.value_clip
        )
        losses, losses_clipped = (values - returns) ** 2, (clipped - returns) ** 2
        value_losses = 0.5 * torch.maximum(losses, losses_clipped) * mask
        with torch.no_grad():  # as TRL names them
            out = {
                "policy/clipfrac_avg": stats["clipfrac"],
                "policy/approxkl_avg": stats["approxkl"],
                "val/ratio": stats["ratio"],
                "policy/ratio_max_deviation": stats["ratio_max_deviation"],
                "policy/entropy_avg": masked_mean(token_entropy(logits), mask),
                "loss/policy_avg": masked_mean(policy_losses, mask),
                "loss/value_avg": masked_mean(value_losses, mask),
                "val/clipfrac_avg": masked_mean((losses_clipped > losses).float(), mask),
            }
        return policy_losses + self.settings.vf_coef * value_losses, out


def ppo(
    ppo_config: dict,
    train_config: dict,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    reward_fn=None,
) -> dict:
    """PPO from ``ppo_config["base"]`` (an SFT model) with a reward model or the prompts' answers."""
    pcfg = PPOConfig.from_dict(ppo_config)
    cfg = rl_train_config(train_config)
    return run_trainer(
        lambda: PPOTrainer(
            pcfg, cfg, reward_fn=reward_fn, resume=resume, progress=progress, overwrite=overwrite
        )
    )
