"""Logit processors, beam search, stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.generate import SamplingConfig, beam_search, generate, generate_text, process_logits
from scratchlm.generate.sampling import apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
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
    assert kept(apply_top_p(logits_of([0.2, 0.5, 0.3]), 0.7)) == [
        False,
        True,
        True,
    ]  # vocabulary order restored


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
    return GPT(
        GPTConfig(
            vocab_size=40, n_layer=2, n_head=2, d_model=32, block_size=32, init_std=0.4, position="rope"
        )
    )


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


def test_beam_search_past_the_context_window_with_and_without_cache(peaked_model):
    """40 new tokens on a 32-position model: the window slides, and both paths still agree."""
    cached = beam_search(peaked_model, list(range(1, 21)), 40, beam_width=3)
    uncached = beam_search(peaked_model, list(range(1, 21)), 40, beam_width=3, use_cache=False)
    assert [ids for ids, _ in cached] == [ids for ids, _ in uncached]


def test_cache_is_sized_for_the_generation_not_the_context(peaked_model, monkeypatch):
    from scratchlm.generate import KVCache

    sizes = []
    real = KVCache.for_model.__func__

    def spy(cls, model, batch, max_len=None):
        sizes.append(max_len)
        return real(cls, model, batch, max_len)

    monkeypatch.setattr(KVCache, "for_model", classmethod(spy))
    generate(peaked_model, [1, 2, 3, 4, 5], 10, SamplingConfig(temperature=0))
    beam_search(peaked_model, [1, 2, 3], 6, beam_width=4)
    generate(peaked_model, list(range(1, 31)), 10, SamplingConfig(temperature=0))  # window slides at 32
    assert sizes[:2] == [15, 9]
    assert all(s <= 32 for s in sizes[2:]) and sizes[2] == 32


def test_kv_cache_reorder_copies_rows_and_only_the_filled_part():
    from scratchlm.generate import KVCache

    cache = KVCache(n_layer=2, batch=3, n_kv_head=1, max_len=8, head_dim=2)
    k = torch.arange(2 * 3 * 1 * 5 * 2, dtype=torch.float32).view(2, 3, 1, 5, 2)
    for layer in range(2):
        cache.update(layer, k[layer], -k[layer])
    cache.advance(5)
    cache.k[:, :, :, 5:] = 99.0  # beyond `length`: never read, so never worth copying
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.k[:, :, :, :5], k[:, [2, 2, 0]]) and torch.equal(
        cache.v[:, :, :, :5], -k[:, [2, 2, 0]]
    )
    assert (cache.k[:, :, :, 5:] == 99.0).all()  # untouched
    cache.reorder(torch.tensor([1]))  # fewer rows
    assert cache.k.shape[1] == 1 and torch.equal(cache.k[:, 0, :, :5], k[:, 2])


# --- streaming text: never show a stop string, decode incrementally -------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scratchlm.generate import TextStream  # noqa: E402


def reference_text(tokenizer, ids, stop):
    text = tokenizer.decode(ids)
    hits = [text.find(s) for s in stop if s and s in text]
    return text[: min(hits)] if hits else text


PIECES = ["Hello", " world", "\n\n", "User", ":", " é", "漢字", "🙂", "a", "b", "\n", "Us", "er:", "😀x"]


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=25),
    stop=st.lists(st.sampled_from(["\n\nUser:", "User", "🙂", "é", "ab", "漢字😀", "zzz"]), max_size=3),
)
def test_streamed_text_equals_the_cut_text_and_never_shows_a_stop_string(gpt2, pieces, stop):
    ids = gpt2.encode("".join(pieces))
    expected = reference_text(gpt2, ids, stop)
    stream_ = TextStream(gpt2, stop)
    chunks = [stream_.push(i) for i in ids] + [stream_.finish()]
    assert "".join(chunks) == stream_.text == expected
    shown = ""
    for chunk in chunks:
        shown += chunk
        assert not any(s in shown for s in stop if s)  # no stop string is ever shown, even in part
        assert expected.startswith(shown)


def test_multibyte_character_split_across_tokens_is_held_until_complete(gpt2):
    ids = gpt2.encode("🙂")
    assert len(ids) > 1  # byte-level BPE splits this emoji
    stream_ = TextStream(gpt2)
    assert [stream_.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream_.push(ids[-1]) == "🙂"


def test_streaming_decodes_each_token_once(peaked_model):
    """Work per token is constant: each token's bytes are decoded once, never the whole text again."""
    tok = CharTokenizer([chr(ord("a") + i) for i in range(40)])
    calls = []
    real = tok.decode_bytes

    def counted(ids, **kwargs):
        ids = list(ids)
        calls.append(len(ids))
        return real(ids, **kwargs)

    tok.decode_bytes = counted
    pieces = []
    text = generate_text(
        peaked_model, tok, "ab", 60, SamplingConfig(temperature=0), on_text=pieces.append, stop=["zzzz"]
    )
    assert "".join(pieces) == text
    assert calls == [1] * 60


def test_generation_stats_measure_prefill_and_decode(peaked_model):
    from scratchlm.generate import GenerationStats

    tok = CharTokenizer([chr(ord("a") + i) for i in range(40)])
    stats = GenerationStats()
    text = generate_text(peaked_model, tok, "abcdef", 30, SamplingConfig(temperature=0), stats=stats)
    s = stats.summary()
    assert s["prompt_tokens"] == 6 and s["output_tokens"] == len(text) == 30
    assert 0 < s["ttft_s"] <= s["e2e_s"]
    assert s["tpot_s"] * 29 == pytest.approx(s["e2e_s"] - s["ttft_s"], rel=1e-9)
    assert s["prefill_tokens_per_second"] == pytest.approx(6 / s["ttft_s"])
    assert s["decode_tokens_per_second"] == pytest.approx(1 / s["tpot_s"])
    assert s["itl_median_s"] <= s["itl_max_s"]
    assert "TTFT" in stats.format()


@pytest.mark.parametrize(
    "text,expected", [("Hi\n\nUser: x", "Hi"), ("Hi\n\nUser! x", "Hi\n\n"), ("Hi\n\nUser", "Hi\n\n")]
)
def test_a_longer_stop_string_that_began_earlier_wins(gpt2, text, expected):
    """Stop strings "\\n\\nUser:" and "User": when "User" arrives, "\\n\\nUser:" (which began earlier)
    may still complete, so the stream must wait for the next token before choosing the cut."""
    stream_ = TextStream(gpt2, ["\n\nUser:", "User"])
    chunks = [stream_.push(i) for i in gpt2.encode(text)] + [stream_.finish()]
    assert (
        "".join(chunks)
        == stream_.text
        == expected
        == reference_text(gpt2, gpt2.encode(text), ["\n\nUser:", "User"])
    )
