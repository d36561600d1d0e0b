"""Sampling draws from the distribution each processor's definition gives, checked over 10^5 draws.

The definitions, written here in plain Python apart from the code under test:
* temperature T: p_i ∝ exp(l_i / T);
* top-k (Fan et al. 2018): keep the k most likely tokens, renormalise;
* top-p, nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
  probability reaches p (the token that crosses p is kept), renormalise;
* min-p (Nguyen et al. 2024): keep the tokens whose probability is at least min_p times the most
  likely token's, renormalise.
Both samplers are checked: the one-request path (``generate.sampling.choose``) and the engine's
batched sampler (``serve.sampler.sample``). With 10^5 draws over 10 tokens the total variation
between the empirical and the true distribution is about 0.004 (its expectation is below
0.5·Σ sqrt(p_i/n)); the bound 0.012 is three times that, while every off-by-one in a definition
below moves at least 0.05 of probability. Tokens outside the kept set must never be drawn at all.
(Whether a bound is ``>=`` or ``>`` shows only when a probability equals it exactly, which float32
softmax outputs do not reliably do: no case here sits on a boundary.)
"""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.generate.sampling import SamplingConfig, choose

# Probabilities 0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01 (in shuffled order).
PROBS = [0.06, 0.30, 0.02, 0.15, 0.05, 0.20, 0.01, 0.10, 0.03, 0.08]
LOGITS = [math.log(p) + 1.7 for p in PROBS]  # an offset softmax ignores
N = 100_000
BOUND = 0.012


def _normalised(weights: dict[int, float]) -> list[float]:
    total = sum(weights.values())
    return [weights.get(i, 0.0) / total for i in range(len(LOGITS))]


def expected(temperature=1.0, top_k=None, top_p=None, min_p=None) -> list[float]:
    weights = {i: math.exp(l / temperature) for i, l in enumerate(LOGITS)}
    probs = _normalised(weights)
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = set(order)
    if top_k is not None:
        kept &= set(order[:top_k])
        probs = _normalised({i: probs[i] for i in kept})
    if top_p is not None:
        nucleus, mass = set(), 0.0
        for i in (i for i in order if i in kept):
            nucleus.add(i)
            mass += probs[i]
            if mass >= top_p:
                break
        kept &= nucleus
        probs = _normalised({i: probs[i] for i in kept})
    if min_p is not None:
        kept &= {i for i in kept if probs[i] >= min_p * max(probs)}
        probs = _normalised({i: probs[i] for i in kept})
    return probs


CASES = {
    "temperature 0.7": dict(temperature=0.7),
    "top-k 3": dict(top_k=3),
    "top-p 0.6 (0.30 + 0.20 + 0.15 crosses it)": dict(top_p=0.6),
    "min-p 0.3 (keeps p >= 0.09)": dict(min_p=0.3),
    "top-k 5, top-p 0.8, temperature 1.3": dict(temperature=1.3, top_k=5, top_p=0.8),
}


def _total_variation(counts: torch.Tensor, probs: list[float]) -> float:
    return 0.5 * sum(abs(c / N - p) for c, p in zip(counts.tolist(), probs))


def _check(counts: torch.Tensor, probs: list[float]) -> None:
    support = {i for i, p in enumerate(probs) if p > 0}
    drawn = {i for i, c in enumerate(counts.tolist()) if c > 0}
    assert drawn == support, f"drew {sorted(drawn)}, the definition keeps {sorted(support)}"
    tv = _total_variation(counts, probs)
    assert tv < BOUND, f"total variation {tv:.4f} from the definition (bound {BOUND})"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_one_request_sampler_follows_the_definitions(case):
    settings = CASES[case]
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor(LOGITS).expand(N, -1)
    ids = choose(logits, SamplingConfig(**settings), generator=generator)[:, 0]
    _check(torch.bincount(ids, minlength=len(LOGITS)), expected(**settings))


ENGINE_CASES = [c for c in sorted(CASES) if not c.startswith("temperature")]  # the same processors


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_the_engines_batched_sampler_follows_the_definitions(case):
    from scratchlm.serve import SamplingParams
    from scratchlm.serve.sampler import sample
    from scratchlm.serve.sequence import Sequence

    settings = CASES[case]
    torch.manual_seed(0)
    batch = 10_000  # ten calls of a 10,000-row batch: 10^5 draws
    seqs = [Sequence([1], SamplingParams(max_tokens=1, **settings)) for _ in range(batch)]
    logits = torch.tensor(LOGITS).expand(batch, -1)
    tokens = []
    for _ in range(N // batch):
        drawn, _, errors = sample(logits, seqs)
        assert errors.count(None) == batch
        tokens += drawn
    _check(torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)), expected(**settings))


def test_the_definitions_themselves():
    """The hand-written definitions on the cases where the answer is plain arithmetic."""
    assert [round(p, 6) for p in expected(top_k=3)] == [
        round(p, 6) for p in [0, 0.30 / 0.65, 0, 0.15 / 0.65, 0, 0.20 / 0.65, 0, 0, 0, 0]
    ]
    assert sum(p > 0 for p in expected(top_p=0.6)) == 3  # 0.30 + 0.20 < 0.6 <= 0.30 + 0.20 + 0.15
    assert sum(p > 0 for p in expected(min_p=0.3)) == 4  # 0.30, 0.20, 0.15, 0.10 >= 0.09
