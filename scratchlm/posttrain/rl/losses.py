"""The pure functions of RL on a language model: per-token log-probabilities, advantages, losses.

Tensors in, tensors out, no model and no state: each is tested on its own
(``tests/posttrain/test_rl.py``) and read beside its paper.

* :func:`token_logps`, :func:`token_entropy`, :func:`sampling_logits`, :func:`masked_mean`: the
  quantities every method takes over a reply's tokens (mask 1).
* :func:`gae`: generalised advantage estimation (Schulman et al., 2016), PPO's advantages from
  per-token rewards and a value head; :func:`whiten` normalises them over a rollout.
* :func:`group_advantages`: GRPO's baseline, the mean reward of a group of replies to one prompt
  (Shao et al., 2024), optionally divided by the group's std (dropped by Dr. GRPO, Liu et al., 2025).
* :func:`clipped_surrogate`: PPO's clipped policy objective (Schulman et al., 2017).
* KL estimators of KL(π ‖ π_ref) from samples (Schulman, "Approximating KL divergence", 2020):
  :func:`kl_k1` (``log π − log π_ref``, unbiased, per-token sign either way: PPO's per-token
  penalty in the reward) and :func:`kl_k3` (``exp(ref − logp) − (ref − logp) − 1``: ≥ 0, unbiased,
  0 where the policy equals the reference: GRPO's term in the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, vocab: int | None = None) -> torch.Tensor:
    """The logits of the distribution the rollouts sample from: the tokenizer's ids only (the
    engine never samples a padding row of the model's table) and divided by the temperature,
    float32. Every log-probability of the loop (old, new, reference) is taken from these."""
    return logits[..., :vocab].float() / temperature


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target) at every position: (B, T, V), (B, T) -> (B, T) float32."""
    z = logits.float()
    return z.gather(-1, targets.clamp_min(0)[..., None])[..., 0] - torch.logsumexp(z, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position: (B, T, V) -> (B, T)."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (F.softmax(z, -1) * z).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the reply tokens (mask 1)."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token ``log π − log π_ref`` over the reply (0 outside it): the plain estimator."""
    return (logps - ref_logps) * mask


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(d) − d − 1`` with ``d = log π_ref − log π`` over the reply (0 outside it):
    never negative, unbiased, 0 where the policy equals the reference."""
    d = torch.where(mask.bool(), ref_logps - logps, 0.0)  # outside the reply exp(d) could overflow
    return (torch.exp(d) - d - 1) * mask


def clipped_surrogate(logps, old_logps, advantages, mask, clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped policy loss per token (to minimise: minus the objective; 0 outside the
    reply), and the micro-batch's ratio statistics: how often the clip was active."""
    ratio = torch.exp(torch.where(mask.bool(), logps - old_logps, 0.0))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    losses = torch.maximum(unclipped, clipped) * mask
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "ratio": masked_mean(ratio, mask),
            "ratio_max_deviation": ((ratio - 1).abs() * mask).max(),
            "approxkl": masked_mean(0.5 * (logps - old_logps) ** 2, mask),
        }
    return losses, stats


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimates over each row's reply tokens (mask 1, contiguous):
    (B, T) rewards, values, mask -> (advantages, returns), 0 outside the reply."""
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        going_on = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)  # does the episode continue?
        next_value = values[:, t + 1] * going_on if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * going_on * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values shifted and scaled to mean 0 and variance 1 over the reply tokens (0 outside them)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, dict]:
    """(N,) rewards in groups of ``group_size`` consecutive replies -> (N,) advantages, and stats."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).float()
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (std + 1e-4)
    stats = {
        "reward": r.mean().item(),
        "reward_std": std.mean().item(),
        "frac_reward_zero_std": (std < 1e-6).float().mean().item(),
    }
    return advantages.view(-1), stats
