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

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from scratchlm.config import Rule

# What each sampling value allows: the one check of `scratchlm sample`, `scratchlm generate` and the
# engine's SamplingParams (each names the values its own way: --max-new-tokens, max_tokens).
SAMPLING_RULES = {
    "max_new_tokens": Rule(type=int, min=1),
    "num_samples": Rule(type=int, min=1),
    "beam_width": Rule(type=int, min=1),
    "temperature": Rule(type=float, min=0, why="0 = greedy"),
    "top_k": Rule(type=int, min=0, why="0 = off"),
    "top_p": Rule(type=float, above=0, max=1),
    "min_p": Rule(type=float, min=0, max=1),
    "repetition_penalty": Rule(type=float, above=0, why="1 = off"),
    "length_penalty": Rule(type=float, expected="a finite number"),
}


def check_sampling(values: Mapping[str, object], names: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError("<name> must be ..., got ...")`` for the first value of ``values`` (keys of
    :data:`SAMPLING_RULES`) that its rule refuses; a caller leaves out what is not set (top_k=None).
    ``names`` spells a key the caller's way in the message (``{"max_new_tokens": "--max-new-tokens"}``)."""
    for key, value in values.items():
        SAMPLING_RULES[key].require(value, (names or {}).get(key, key))


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None (or 0) = off
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        optional = {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}  # None = off
        check_sampling(
            {
                "temperature": self.temperature,
                "repetition_penalty": self.repetition_penalty,
                **{k: v for k, v in optional.items() if v is not None},
            }
        )
        self.top_k = self.top_k or None


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
