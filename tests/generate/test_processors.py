"""The logit processors at their boundaries, by hand: which settings are valid, the repetition
penalty on one token and on logits between 0 and 1, min-p = 1, top-p = 1 keeping even the tiniest
tail, the penalty reaching ``choose``, greedy per row, and draws from the caller's generator.
(The distributions themselves are checked over 10^5 draws in test_sampling_distributions.py.)"""

from __future__ import annotations

import pytest
import torch

from scratchlm.generate.sampling import (
    SamplingConfig,
    apply_min_p,
    apply_repetition_penalty,
    choose,
    process_logits,
)

INF = float("inf")


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0), dict(top_k=0), dict(top_k=1), dict(top_p=1.0), dict(min_p=0.0), dict(min_p=1.0)],
)
def test_the_edges_of_each_range_are_accepted(kw):
    SamplingConfig(**kw)


def test_top_k_of_0_is_off():
    assert SamplingConfig(top_k=0).top_k is None


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(temperature=-0.1), r"temperature must be a number >= 0 \(0 = greedy\), got -0.1"),
        (dict(temperature=float("nan")), r"temperature must be a number >= 0 \(0 = greedy\), got nan"),
        (dict(temperature=float("inf")), r"temperature must be a number >= 0 \(0 = greedy\), got inf"),
        (dict(top_k=-1), r"top_k must be an integer >= 0 \(0 = off\), got -1"),
        (dict(top_k=2.5), r"top_k must be an integer >= 0 \(0 = off\), got 2.5"),
        (dict(top_p=0.0), "top_p must be a number > 0 and <= 1, got 0.0"),
        (dict(top_p=1.5), "top_p must be a number > 0 and <= 1, got 1.5"),
        (dict(min_p=-0.1), "min_p must be a number >= 0 and <= 1, got -0.1"),
        (dict(min_p=1.5), "min_p must be a number >= 0 and <= 1, got 1.5"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be a number > 0 \(1 = off\), got 0.0"),
    ],
)
def test_settings_outside_their_range_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kw)


def test_the_repetition_penalty_on_a_single_token_and_below_1():
    logits = torch.tensor([[0.5, -0.5, 2.0, 0.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0]]), 2.0)  # one previous token
    torch.testing.assert_close(out, torch.tensor([[0.25, -0.5, 2.0, 0.0]]))  # 0.5 > 0: divided
    out = apply_repetition_penalty(logits, torch.tensor([[1, 3]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[0.5, -1.0, 2.0, 0.0]]))  # negative: multiplied


def test_min_p_of_1_keeps_the_top_token_and_its_ties_only():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.9]])
    out = apply_min_p(logits, 1.0)
    assert torch.equal(out, torch.tensor([[-INF, 3.0, 3.0, -INF]]))


def test_top_p_of_1_keeps_every_token_however_small():
    logits = torch.tensor([[30.0, 0.0, -30.0, -60.0]])  # the tail's mass is below float32's resolution
    out = process_logits(logits, SamplingConfig(top_p=1.0))
    assert torch.isfinite(out).all()


def test_process_logits_applies_the_penalty_then_the_temperature():
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    out = process_logits(
        logits, SamplingConfig(temperature=0.5, repetition_penalty=4.0), torch.tensor([[0, 2]])
    )
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, -8.0]]))


def test_choose_applies_the_penalty_and_takes_the_argmax_of_each_row():
    logits = torch.tensor([[2.0, 1.5, 0.0], [0.0, 1.0, 3.0]])
    greedy = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert choose(logits, greedy).tolist() == [[0], [2]]
    assert choose(logits, greedy, previous=torch.tensor([[0], [0]])).tolist() == [[1], [2]]


def test_choose_draws_from_the_generator_it_is_given():
    logits = torch.zeros(4, 50)
    config = SamplingConfig(temperature=1.0)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global RNG differs; the generator does not
        draws.append(choose(logits, config, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(draws[0], draws[1])
    torch.manual_seed(1)
    assert not torch.equal(draws[0], choose(logits, config, generator=torch.Generator().manual_seed(8)))
