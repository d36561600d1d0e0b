"""Our byte-level BPE against real peers: tiktoken built from the same ranks, GPT-2's ids,
and Hugging Face `tokenizers` trained on the same corpus."""

from __future__ import annotations

import json

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.downloads import fetch
from scratchlm.tokenizers import train_bpe
from scratchlm.tokenizers.bpe import token_to_str
from scratchlm.tokenizers.patterns import CL100K_PATTERN, O200K_PATTERN

unicode_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",)), max_size=300
)


def test_gpt2_hello(gpt2):
    assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    gpt2.backend = "python"
    try:
        assert gpt2.encode("Hello, I am") == [15496, 11, 314, 716]
    finally:
        gpt2.backend = "tiktoken"
    assert gpt2.vocab_size == 50257 and gpt2.eot_token == 50256


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's *own* loader of OpenAI's GPT-2 files: an independent peer for our loader."""
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(fetch("gpt2-vocab")), str(fetch("gpt2-encoder"))
    )
    from scratchlm.tokenizers.patterns import GPT2_PATTERN

    return tiktoken.Encoding(
        "gpt2-peer", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def test_gpt2_reference_encoder_equals_tiktoken_on_shakespeare(gpt2, tiktoken_gpt2, shakespeare_text):
    text = shakespeare_text[:300_000]
    gpt2.backend = "python"
    try:
        ours = gpt2.encode(text)
    finally:
        gpt2.backend = "tiktoken"
    assert ours == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.encode(text) == ours


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_gpt2_equals_tiktoken_on_random_unicode(gpt2, tiktoken_gpt2, text):
    gpt2.backend = "python"
    try:
        assert gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    finally:
        gpt2.backend = "tiktoken"


def test_trained_bpe_reference_equals_tiktoken_on_shakespeare(shakespeare_bpe, shakespeare_text):
    reference = shakespeare_bpe.encode_ordinary_reference(shakespeare_text)
    assert reference == shakespeare_bpe.to_tiktoken().encode_ordinary(shakespeare_text)
    assert shakespeare_bpe.decode(reference) == shakespeare_text


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_trained_bpe_reference_equals_tiktoken_on_random_unicode(shakespeare_bpe, text):
    assert shakespeare_bpe.encode_ordinary_reference(text) == shakespeare_bpe.to_tiktoken().encode_ordinary(
        text
    )


@pytest.mark.parametrize("pattern", ["cl100k", "o200k"])
def test_other_patterns_reference_equals_tiktoken(pattern, shakespeare_text):
    text = shakespeare_text[:200_000] + "\n 12345 don't  DON'T\r\n\ttabs  日本語 émoji 🤖🤖 x/y//z\n\n"
    tok = train_bpe(text, 600, pattern)
    assert tok.pattern == {"cl100k": CL100K_PATTERN, "o200k": O200K_PATTERN}[pattern]
    assert tok.encode_ordinary_reference(text) == tok.to_tiktoken().encode_ordinary(text)


def test_special_tokens_like_tiktoken(shakespeare_bpe):
    enc = shakespeare_bpe.to_tiktoken()
    text = "To be<|endoftext|>or not"
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' at character 5.*allowed_special"):
        shakespeare_bpe.encode(text)
    with pytest.raises(ValueError):
        enc.encode(text)  # the peer refuses it too
    assert shakespeare_bpe.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert shakespeare_bpe.encode(text, allowed_special="all").count(shakespeare_bpe.eot_token) == 1
    assert shakespeare_bpe.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=())
    assert shakespeare_bpe.eot_token not in shakespeare_bpe.encode(text, disallowed_special=())


def test_special_token_spelling_is_never_merged():
    text = ("the end<|endoftext|>" * 300) + "x"
    tok = train_bpe(text, 300, "gpt2", ["<|endoftext|>"])
    assert not any(b"<|" in t or b"|>" in t for t in tok.vocab[256:]), (
        "merges learned from a special token's spelling"
    )
    assert tok.encode("a<|endoftext|>", allowed_special="all")[-1] == tok.eot_token


# --- Hugging Face tokenizers --------------------------------------------------------------
def _hf_bpe(texts, vocab_size, pattern=None):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    if pattern is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


def _hf_merges(hf) -> list[tuple[str, str]]:
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_trained_merges_equal_huggingface(pattern, shakespeare_text):
    """Same corpus, pattern and size: the *same merges in the same order*.

    This is the strong form of agreement, and it holds because the tie-break is aligned: both
    trainers pick the highest count and, among equal counts, the smallest (left id, right id),
    with ids 0-255 in GPT-2's byte order, which is Hugging Face's byte-level alphabet order.
    """
    text = shakespeare_text[:400_000]
    ours = train_bpe(text, 1024, pattern, special_tokens=())
    hf = _hf_bpe([text], 1024, None if pattern == "gpt2" else CL100K_PATTERN)
    ours_merges = [(token_to_str(ours.vocab[a]), token_to_str(ours.vocab[b])) for a, b in ours.merges]
    assert ours_merges == _hf_merges(hf)
    # And the same ids: Hugging Face's vocabulary numbering is ours.
    assert {token_to_str(t): i for i, t in enumerate(ours.vocab)} == hf.get_vocab()
    sample = shakespeare_text[400_000:450_000]
    assert ours.encode_ordinary_reference(sample) == hf.encode(sample).ids
