"""Evaluation and fine-tuning cross-entropy against PyTorch's own: the chunked per-token NLL, and
the masked mean over several positions (sum ÷ count, with the count a float32 tensor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.models.loss import masked_token_loss, masked_token_loss_sum, token_nll


def test_token_nll_equals_cross_entropy_in_chunks_that_do_not_divide_the_rows():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 7, 11) * 3, torch.randint(0, 11, (3, 7))
    expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none").view(3, 7)
    for chunk in (1, 4, 1024):
        out = token_nll(logits, targets, chunk_rows=chunk)
        assert out.shape == (3, 7) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out = token_nll(logits.bfloat16(), targets, chunk_rows=5)
    assert out.dtype == torch.float32
    expected16 = F.cross_entropy(
        logits.bfloat16().float().reshape(-1, 11), targets.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(out, expected16.view(3, 7), atol=1e-5, rtol=1e-5)


def test_token_nll_is_built_on_the_logits_device():
    """(``meta``: a device that is not the CPU, so a buffer left on the default device shows.)"""
    logits, targets = torch.zeros(2, 3, 5, device="meta"), torch.zeros(2, 3, dtype=torch.long, device="meta")
    out = token_nll(logits, targets, chunk_rows=4)
    assert out.device.type == "meta" and out.shape == (2, 3) and out.dtype == torch.float32


def test_the_masked_loss_is_the_mean_over_the_counted_positions():
    torch.manual_seed(1)
    logits, targets = torch.randn(2, 4, 9), torch.randint(0, 9, (2, 4))
    targets[1, 3] = -1  # padding, masked out
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]])  # an integer mask
    per_token = F.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1).clamp_min(0), reduction="none")
    kept = per_token[mask.reshape(-1).bool()]
    loss, count = masked_token_loss(logits, targets, mask)
    assert count.dtype == torch.float32 and count.item() == 4.0
    torch.testing.assert_close(loss, kept.mean())
    total, count = masked_token_loss_sum(logits, targets, mask)
    torch.testing.assert_close(total, kept.sum())
    assert count.dtype == torch.float32
