"""Per-token cross-entropy for evaluation, without a (B, T, V) float32 log-probability tensor.

Training needs the full log-softmax anyway (its gradient is ``softmax - onehot``), but evaluation
only needs one number per position: ``-log p(y) = logsumexp(z) - z[y]``. Computed a block of
positions at a time, the extra memory is ``chunk_rows x V`` floats instead of ``B x T x V``.
"""

from __future__ import annotations

import torch


def masked_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the positions where ``mask`` is 1 (fine-tuning: the assistant's
    tokens only); returns (loss, number of positions counted).

    A batch in which every position is masked (a conversation whose assistant turn was cut off by
    the context) gives loss 0 with no gradient, never the NaN of a mean over nothing.
    """
    total, count = masked_token_loss_sum(logits, targets, mask)
    return total / count.clamp_min(1), count


def masked_token_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the masked positions, and their number (to divide by a count
    taken over a whole step: every micro-batch and every rank)."""
    V = logits.shape[-1]
    weights = mask.reshape(-1).to(torch.float32)
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, V), targets.reshape(-1).clamp_min(0), reduction="none"
    )  # masked targets may be -1 (padding)
    return (losses * weights).sum(), weights.sum()


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """``-log p(target)`` at every position, (B, T) float32, from (B, T, V) logits.

    ``-log softmax(z)[y] = logsumexp(z) - z[y]``, computed ``chunk_rows`` positions at a time, so no
    (B, T, V) float32 log-probability tensor is ever built: at GPT-2's vocabulary, batch 32 and
    context 1024 that tensor alone is 6.6 GB. Peak extra memory is ``chunk_rows x V`` floats.
    """
    V = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, V), targets.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_rows):
        z = flat[start : start + chunk_rows].float()
        y = flat_targets[start : start + chunk_rows, None]
        out[start : start + chunk_rows] = torch.logsumexp(z, dim=-1) - z.gather(-1, y)[:, 0]
    return out.view(targets.shape)
