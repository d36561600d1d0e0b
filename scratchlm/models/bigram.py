"""Bigram language models: checkpoint A of the learning path.

A bigram model predicts the next token from the current one alone: ``P(next | current)``. It is
the same factorization a GPT uses, ``P(x_1..x_T) = prod_t P(x_t | x_<t)``, with the context cut
to one token. Two ways to get the table of probabilities:

* :class:`CountBigram` counts: ``P(b | a) = (count(a, b) + k) / (count(a, .) + k * V)``. With
  ``k = 0`` this is the maximum-likelihood estimate; add-k smoothing gives unseen pairs a little
  probability so that held-out text never costs infinite loss.
* :class:`NeuralBigram` learns a ``V x V`` table of logits by gradient descent on cross-entropy.
  Its optimum is the same maximum-likelihood table (softmax of a row = the row's frequencies),
  which makes it the first sanity check of any training loop: it must converge to the counts.

Documents are framed by one boundary token (``<|endoftext|>``) at both ends, so the model also
learns how sequences start and end: makemore's ``.`` token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def bigram_pairs(docs: Sequence[Sequence[int]], boundary: int | None) -> tuple[np.ndarray, np.ndarray]:
    """All (current, next) id pairs of the documents, each framed by ``boundary`` when given."""
    xs, ys = [], []
    for ids in docs:
        seq = np.asarray(ids, dtype=np.int64)
        if boundary is not None:
            seq = np.concatenate([[boundary], seq, [boundary]])
        xs.append(seq[:-1])
        ys.append(seq[1:])
    if not xs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def _nll(log_probs: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood (nats per token) of the pairs under a V x V log-prob table."""
    if len(x) == 0:
        return float("nan")
    return -log_probs[torch.from_numpy(x), torch.from_numpy(y)].double().mean().item()


class CountBigram:
    def __init__(self, vocab_size: int, smoothing: float = 1.0):
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.vocab_size, self.smoothing = vocab_size, smoothing
        self.counts = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)

    def fit(self, x: np.ndarray, y: np.ndarray) -> CountBigram:
        flat = np.bincount(x * self.vocab_size + y, minlength=self.vocab_size**2)
        self.counts += torch.from_numpy(flat.reshape(self.vocab_size, self.vocab_size)).double()
        return self

    def log_probs(self) -> torch.Tensor:
        smoothed = self.counts + self.smoothing
        totals = smoothed.sum(1, keepdim=True)
        # A row never seen with k = 0 has no estimate: give it a uniform distribution.
        table = torch.where(totals > 0, smoothed / totals.clamp_min(1e-300), 1.0 / self.vocab_size)
        return table.log()

    def nll(self, x: np.ndarray, y: np.ndarray) -> float:
        return _nll(self.log_probs(), x, y)


class NeuralBigram(nn.Module):
    """One ``V x V`` table of logits: row ``a`` holds the logits for the token after ``a``."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        logits = self.logits[x]  # (N, V): embedding lookup *is* the whole model
        loss = None if y is None else F.cross_entropy(logits, y)
        return logits, loss

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, steps: int = 300, lr: float = 0.3, batch_size: int = 1 << 16,
        seed: int = 0, progress: bool = False,
    ) -> list[float]:
        """Adam on cross-entropy; minibatches of ``batch_size`` pairs (all pairs if fewer).

        Runs on whatever device the module is on (``model.to(device)`` first).
        """
        from tqdm.auto import tqdm

        device = self.logits.device
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.01)
        history = []
        for _ in tqdm(range(steps), desc="neural bigram", disable=not progress):
            if len(xt) > batch_size:
                idx = torch.randint(len(xt), (batch_size,), generator=generator, device=device)
                bx, by = xt[idx], yt[idx]
            else:
                bx, by = xt, yt
            _, loss = self(bx, by)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(loss.item())
        return history

    def log_probs(self) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(self.logits.detach().cpu().double(), dim=-1)

    def nll(self, x: np.ndarray, y: np.ndarray) -> float:
        return _nll(self.log_probs(), x, y)


def sample_bigram(
    log_probs: torch.Tensor, n: int, *, start: int, stop: int | None, max_tokens: int = 100, seed: int = 0
) -> list[list[int]]:
    """Draw ``n`` sequences: begin after ``start``, stop at ``stop`` (not included) or ``max_tokens``."""
    probs = log_probs.exp()
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        current, seq = start, []
        for _ in range(max_tokens):
            current = torch.multinomial(probs[current], 1, generator=generator).item()
            if current == stop:
                break
            seq.append(current)
        out.append(seq)
    return out
