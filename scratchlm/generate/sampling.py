"""Logit processors: how a next-token distribution becomes a choice (checkpoint D).

Each function takes logits ``(B, V)`` and returns new logits; masked-out tokens get ``-inf``.
They compose in the order :func:`process_logits` applies them: repetition penalty, temperature,
top-k, top-p, min-p.

* **temperature** divides logits: < 1 sharpens the distribution, > 1 flattens it; 0 means greedy.
* **top-k** keeps the k most likely tokens.
* **top-p** (nucleus) keeps the smallest set of most likely tokens whose probability reaches p;
  the token that crosses the threshold is kept, so the set is never empty.
* **min-p** keeps tokens whose probability is at least ``min_p`` times the top token's.
* **repetition penalty** (CTRL) divides positive logits of already-generated tokens by the
  penalty and multiplies negative ones, making repeats less likely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    chosen = logits.gather(1, previous)
    chosen = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits.scatter(1, previous, chosen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token if the tokens *before* it already reach p: the crossing token survives.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor, config: SamplingConfig, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """All processors in order; with ``temperature == 0`` the caller takes the argmax instead."""
    logits = logits.float()
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, config.repetition_penalty)
    if config.temperature > 0:
        logits = logits / config.temperature
    if config.top_k is not None:
        logits = apply_top_k(logits, config.top_k)
    if config.top_p is not None and config.top_p < 1:
        logits = apply_top_p(logits, config.top_p)
    if config.min_p:
        logits = apply_min_p(logits, config.min_p)
    return logits


def choose(
    logits: torch.Tensor,
    config: SamplingConfig,
    previous: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one next token per row: (B, V) logits -> (B, 1) ids."""
    logits = process_logits(logits, config, previous)
    if config.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
