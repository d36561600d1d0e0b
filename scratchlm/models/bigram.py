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

:func:`run_bigram` fits, evaluates and samples both on a prepared dataset (``scratchlm bigram``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.data import Dataset
from scratchlm.device import pick_device
from scratchlm.tokenizers.base import Tokenizer


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
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        steps: int = 300,
        lr: float = 0.3,
        batch_size: int = 1 << 16,
        seed: int = 0,
        progress: bool = False,
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


def run_bigram(
    dataset: str | Path,
    tokenizer: Tokenizer,
    *,
    models=("count", "neural"),
    smoothing: float = 1.0,
    fit_split: str = "train",
    steps: int = 300,
    lr: float = 0.3,
    n_samples: int = 10,
    max_tokens: int = 60,
    seed: int = 0,
    progress: bool = False,
    device: str | None = None,
) -> dict:
    """Fit the requested bigram models; report NLL and perplexity per split, and samples.

    ``fit_split="all"`` fits on every split (the textbook figure: names.txt's count bigram has
    mean NLL 2.4540 over all its bigrams); the default fits on train, so val/test are held out.
    """
    unknown = set(models) - {"count", "neural"}
    if unknown:
        raise ValueError(f"bigram models are 'count' and 'neural', got {sorted(unknown)}")
    ds = Dataset.load(dataset)
    boundary = tokenizer.eot_token
    pairs = {}
    for split in ("train", "val", "test"):
        docs = [tokenizer.encode_ordinary(d) for d in ds.documents(split)]
        pairs[split] = bigram_pairs(docs, boundary)
    pairs["all"] = tuple(np.concatenate([pairs[s][i] for s in ("train", "val", "test")]) for i in (0, 1))
    fit_x, fit_y = pairs[fit_split]
    V = tokenizer.vocab_size
    if V > 20_000:
        raise ValueError(
            f"a bigram table over {V} ids needs {V * V * 8 / 1e9:.1f} GB; use a tokenizer with a smaller vocabulary"
        )
    start_token = boundary if boundary is not None else int(fit_x[0])
    report = {
        "dataset": str(dataset),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": V,
        "boundary_token": boundary,
        "fit_split": fit_split,
        "pairs": {s: int(len(p[0])) for s, p in pairs.items()},
        "models": {},
    }
    for name in models:
        start = time.perf_counter()
        if name == "count":
            model = CountBigram(V, smoothing).fit(fit_x, fit_y)
            extra = {"smoothing": smoothing}
        else:
            model = NeuralBigram(V).to(pick_device(device))
            history = model.fit(fit_x, fit_y, steps=steps, lr=lr, seed=seed, progress=progress)
            extra = {
                "steps": steps,
                "lr": lr,
                "final_train_loss": history[-1],
                "device": str(model.logits.device),
            }
        seconds = time.perf_counter() - start
        nll = {s: model.nll(*pairs[s]) for s in ("train", "val", "test", "all")}
        samples = sample_bigram(
            model.log_probs(), n_samples, start=start_token, stop=boundary, max_tokens=max_tokens, seed=seed
        )
        report["models"][name] = {
            **extra,
            "fit_seconds": seconds,
            "nll": nll,
            "perplexity": {s: math.exp(v) if math.isfinite(v) else float("inf") for s, v in nll.items()},
            "samples": [tokenizer.decode(s) for s in samples],
        }
    return report
