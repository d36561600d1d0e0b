"""Post-training losses against their definitions, on numbers small enough to do by hand:
DPO (Rafailov et al., 2023), Bradley–Terry, PPO's clipped surrogate and its statistics (Schulman
et al., 2017), the k3 KL estimator, GAE (Schulman et al., 2016), whitening and GRPO's group
advantages (Shao et al., 2024)."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.posttrain.dpo import dpo_loss, sequence_logps
from scratchlm.posttrain.reward import collate_full, reward_loss
from scratchlm.posttrain.rl.losses import (
    clipped_surrogate,
    gae,
    group_advantages,
    kl_k3,
    masked_mean,
    whiten,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_accuracy_counts_strictly_positive_margins_only():
    # margins: 0.1·(1 − 0) − 0.1·(0 − 0) = 0.1 > 0, and 0 for the second pair (policy = reference)
    loss, m = dpo_loss(t(1.0, -2.0), t(0.0, -3.0), t(0.0, -2.0), t(0.0, -3.0), beta=0.1)
    assert m["rewards/accuracies"].item() == 0.5
    expected = (-math.log(1 / (1 + math.exp(-0.1))) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sequence_logps_counts_a_target_of_id_0():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]])
    targets = torch.tensor([[0, -1]])  # id 0 is a real token; -1 is padding (masked)
    mask = torch.tensor([[1.0, 0.0]])
    expected = 2.0 - math.log(math.exp(2.0) + 1 + math.exp(-1.0))
    assert sequence_logps(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_metrics_by_hand():
    chosen, rejected = t(1.0, 0.5, 2.0), t(1.0, 0.0, 3.0)  # margins 0, 0.5, −1
    loss, m = reward_loss(chosen, rejected)
    softplus = [math.log(2), math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))]
    assert loss.item() == pytest.approx(sum(softplus) / 3, rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # 0 is a tie, not a win; 0.5 is a win
    assert m["margin"].item() == pytest.approx(-0.5 / 3, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(3.5 / 3, rel=1e-6)
    assert m["rewards/rejected"].item() == pytest.approx(4.0 / 3, rel=1e-6)


def test_collate_full_puts_long_ids_on_the_device_asked_for():
    x, last = collate_full([[3, 4, 5], [6]], pad_id=0, device="meta")
    assert x.device.type == "meta" and last.device.type == "meta" and x.dtype == torch.long


def test_masked_mean_of_one_token_is_that_token():
    assert masked_mean(t(3.0, 100.0), t(1.0, 0.0)).item() == 3.0
    assert masked_mean(t(3.0, 100.0), t(0.0, 0.0)).item() == 0.0  # an empty reply: 0, not NaN


def test_clipped_surrogate_clips_below_for_negative_advantages_and_its_statistics():
    clip = 0.2
    # token 0: ratio e^-0.5 ≈ 0.61 < 0.8 with A = −1: clipped at 0.8 (the pessimistic, larger loss)
    # token 1: ratio e^0.1 ≈ 1.105 inside the band, A = 2; token 2 is outside the reply
    logps, old = t(-1.5, -0.9, 5.0), t(-1.0, -1.0, 0.0)
    adv, mask = t(-1.0, 2.0, 7.0), t(1.0, 1.0, 0.0)
    losses, stats = clipped_surrogate(logps, old, adv, mask, clip)
    r0, r1 = math.exp(-0.5), math.exp(0.1)
    torch.testing.assert_close(losses, t(1.0 * 0.8, -2.0 * r1, 0.0))
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx((r0 + r1) / 2, rel=1e-6)
    assert stats["ratio_max_deviation"].item() == pytest.approx(1 - r0, rel=1e-6)
    assert stats["approxkl"].item() == pytest.approx((0.5 * 0.25 + 0.5 * 0.01) / 2, rel=1e-5)


def test_k3_is_exp_d_minus_d_minus_1():
    logps, ref, mask = t(-1.0, -2.0, 0.0), t(-1.5, -1.0, -1e4), t(1.0, 1.0, 0.0)
    d0, d1 = -0.5, 1.0
    expected = t(math.exp(d0) - d0 - 1, math.exp(d1) - d1 - 1, 0.0)
    torch.testing.assert_close(kl_k3(logps, ref, mask), expected)


def test_gae_on_a_reply_that_runs_to_the_last_position():
    gamma, lam = 0.9, 0.8
    rewards, values, mask = t(0.0, 0.5, 1.0)[None], t(0.2, 0.4, 0.3)[None], t(1.0, 1.0, 1.0)[None]
    d2 = 1.0 - 0.3
    d1 = 0.5 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, t(a0, a1, a2)[None])
    torch.testing.assert_close(returns, t(a0 + 0.2, a1 + 0.4, a2 + 0.3)[None])


def test_whiten_by_hand_and_a_constant_gives_zeros():
    values, mask = t(1.0, 2.0, 6.0, 50.0), t(1.0, 1.0, 1.0, 0.0)
    var = (4 + 1 + 9) / 3  # mean 3 over the reply: deviations -2, -1, 3
    expected = t(-2.0, -1.0, 3.0, 0.0) / math.sqrt(var + 1e-8)
    expected[3] = 0.0
    torch.testing.assert_close(whiten(values, mask), expected)
    out = whiten(t(4.0, 4.0, 4.0), t(1.0, 1.0, 1.0))
    assert torch.equal(out, torch.zeros(3))  # no variance: zeros, never NaN


def test_group_advantages_for_groups_of_two_and_of_one():
    adv, stats = group_advantages(t(1.0, 0.0, 2.0, 2.0), group_size=2)
    std = math.sqrt(0.5)  # the sample std (n − 1) of {1, 0}
    torch.testing.assert_close(adv, t(0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0))
    assert stats["reward"] == pytest.approx(1.25)
    assert stats["reward_std"] == pytest.approx(std / 2, rel=1e-6)
    assert stats["frac_reward_zero_std"] == 0.5
    adv, stats = group_advantages(t(1.0, 3.0), group_size=1)  # one reply per prompt: nothing to compare
    assert torch.equal(adv, torch.zeros(2))
    assert stats == {"reward": 2.0, "reward_std": 0.0, "frac_reward_zero_std": 1.0}
    unscaled, _ = group_advantages(t(1.0, 0.0, 2.0, 2.0), group_size=2, scale=False)
    torch.testing.assert_close(unscaled, t(0.5, -0.5, 0.0, 0.0))
