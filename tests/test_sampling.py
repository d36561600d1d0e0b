"""Logit processors, beam search, stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.generate import SamplingConfig, beam_search, generate, generate_text, process_logits
from scratchlm.generate.sampling import apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p
from scratchlm.models.gpt import GPT, GPTConfig
from scratchlm.tokenizers import CharTokenizer


def logits_of(probs):
    return torch.tensor([probs]).log()


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_k_and_min_p():
    logits = logits_of([0.1, 0.4, 0.2, 0.3])
    assert kept(apply_top_k(logits, 2)) == [False, True, False, True]
    assert kept(apply_min_p(logits, 0.6)) == [False, True, False, True]  # >= 0.24


def test_top_p_keeps_the_crossing_token():
    logits = logits_of([0.5, 0.3, 0.2])
    assert kept(apply_top_p(logits, 0.6)) == [True, True, False]  # 0.5 < 0.6: the 0.3 token crosses
    assert kept(apply_top_p(logits, 0.5)) == [True, False, False]
    assert kept(apply_top_p(logits, 0.01)) == [True, False, False]  # never empty
    assert kept(apply_top_p(logits_of([0.2, 0.5, 0.3]), 0.7)) == [False, True, True]  # vocabulary order restored


def test_repetition_penalty_and_temperature():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    scaled = process_logits(logits, SamplingConfig(temperature=0.5))
    assert scaled.tolist() == [[4.0, -4.0, 2.0]]
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0)


@pytest.fixture(scope="module")
def peaked_model():
    torch.manual_seed(3)
    return GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, block_size=32, init_std=0.4, position="rope"))


def distinct_ngrams(seqs, n=2):
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def test_higher_temperature_gives_more_diverse_samples(peaked_model):
    diversity = {}
    for t in (0.3, 1.0, 2.0):
        seqs = generate(peaked_model, [[1]] * 8, 50, SamplingConfig(temperature=t), seed=0)
        diversity[t] = distinct_ngrams(seqs)
    assert diversity[0.3] < diversity[1.0] < diversity[2.0]


def test_beam_search(peaked_model):
    greedy = generate(peaked_model, [1, 2], 12, SamplingConfig(temperature=0))[0]
    assert beam_search(peaked_model, [1, 2], 12, beam_width=1)[0][0] == greedy
    beams = beam_search(peaked_model, [1, 2], 12, beam_width=4)
    assert len(beams) == 4 and [s for _, s in beams] == sorted((s for _, s in beams), reverse=True)
    uncached = beam_search(peaked_model, [1, 2], 12, beam_width=4, use_cache=False)
    assert [ids for ids, _ in beams] == [ids for ids, _ in uncached]
    assert all(math.isclose(a, b, abs_tol=1e-4) for (_, a), (_, b) in zip(beams, uncached))
    # The best beam is at least as likely as greedy (its sequence is scored the same way).
    assert beams[0][1] >= beam_search(peaked_model, [1, 2], 12, beam_width=1)[0][1] - 1e-6


def test_stop_strings_and_streaming(peaked_model):
    tok = CharTokenizer([chr(ord("a") + i) for i in range(40)])
    pieces = []
    full = generate_text(peaked_model, tok, "ab", 40, SamplingConfig(temperature=0), on_text=pieces.append)
    assert "".join(pieces) == full and len(full) == 40
    stop = full[10:12]
    cut = generate_text(peaked_model, tok, "ab", 40, SamplingConfig(temperature=0), stop=[stop])
    assert cut == full[: full.index(stop)]
