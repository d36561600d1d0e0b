"""Checkpoint A: bigram baselines reproduce the known figures on names.txt."""

from __future__ import annotations

import pytest

from scratchlm.models import CountBigram, NeuralBigram, bigram_pairs, sample_bigram
from scratchlm.tokenizers import CharTokenizer


@pytest.fixture(scope="module")
def names_pairs(names):
    tok = CharTokenizer.train(names, ["<|endoftext|>"])
    x, y = bigram_pairs([tok.encode_ordinary(n) for n in names], tok.eot_token)
    return tok, x, y


def test_count_bigram_reference_figures(names_pairs):
    tok, x, y = names_pairs
    assert len(x) == 228_146
    assert CountBigram(tok.vocab_size, 0).fit(x, y).nll(x, y) == pytest.approx(2.4540, abs=1e-3)
    assert CountBigram(tok.vocab_size, 1).fit(x, y).nll(x, y) == pytest.approx(2.4546, abs=1e-3)


def test_neural_bigram_converges_to_the_counts(names_pairs):
    tok, x, y = names_pairs
    count_nll = CountBigram(tok.vocab_size, 0).fit(x, y).nll(x, y)
    model = NeuralBigram(tok.vocab_size)
    history = model.fit(x, y, steps=300, lr=0.3)
    assert history[0] == pytest.approx(
        float(__import__("math").log(tok.vocab_size)), abs=1e-4
    )  # zero logits = uniform
    assert abs(model.nll(x, y) - count_nll) < 0.01


def test_unsmoothed_counts_give_infinite_loss_on_unseen_pairs():
    model = CountBigram(4, 0).fit(*bigram_pairs([[0, 1, 2]], None))
    import numpy as np

    assert model.nll(np.array([0]), np.array([3])) == float("inf")
    assert model.nll(np.array([0]), np.array([1])) == pytest.approx(0.0)


def test_samples_stop_at_the_boundary(names_pairs):
    tok, x, y = names_pairs
    table = CountBigram(tok.vocab_size, 1).fit(x, y).log_probs()
    samples = sample_bigram(table, 20, start=tok.eot_token, stop=tok.eot_token, max_tokens=50, seed=1)
    assert len(samples) == 20
    assert all(tok.eot_token not in s for s in samples)
    assert all(tok.decode(s).isalpha() or s == [] for s in samples)
    assert samples == sample_bigram(table, 20, start=tok.eot_token, stop=tok.eot_token, max_tokens=50, seed=1)
