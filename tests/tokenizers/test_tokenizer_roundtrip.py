"""decode(encode(x)) == x for arbitrary Unicode, for every tokenizer, special tokens included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

EOT = "<|endoftext|>"
unicode_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",)), max_size=200
)


@settings(max_examples=150, deadline=None)
@given(unicode_text, unicode_text)
def test_char_roundtrip(a, b):
    tok = CharTokenizer.train(a + b, [EOT])
    text = a + EOT + b
    ids = tok.encode(text, allowed_special="all")
    assert tok.decode(ids) == text
    assert ids.count(tok.eot_token) == text.count(EOT)
    assert tok.decode(tok.encode_ordinary(a)) == a


@settings(max_examples=150, deadline=None)
@given(unicode_text, unicode_text)
def test_byte_roundtrip(a, b):
    tok = ByteTokenizer.train(special_tokens=[EOT])
    text = a + EOT + b
    assert tok.decode(tok.encode(text, allowed_special="all")) == text
    assert tok.decode(tok.encode(a, disallowed_special=())) == a


@settings(max_examples=150, deadline=None)
@given(unicode_text, unicode_text)
def test_bpe_roundtrip(shakespeare_bpe, gpt2, a, b):
    text = a + EOT + b
    for tok in (shakespeare_bpe, gpt2):
        for backend in ("python", "tiktoken"):
            tok.backend = backend
            assert tok.decode(tok.encode(text, allowed_special="all")) == text
            assert tok.decode(tok.encode_ordinary(a)) == a
        tok.backend = "tiktoken"


def test_saved_tokenizers_roundtrip(tmp_path, shakespeare_bpe, shakespeare_text):
    sample = shakespeare_text[:5000] + " héllo wörld 日本語 🤖"
    for tok in (
        CharTokenizer.train(sample, [EOT]),
        ByteTokenizer.train(special_tokens=[EOT]),
        shakespeare_bpe,
    ):
        path = tok.save(tmp_path / f"{tok.kind}.json")
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok)
        assert loaded.fingerprint == tok.fingerprint
        assert loaded.encode(sample) == tok.encode(sample)
        assert loaded.decode(loaded.encode(sample)) == sample


def test_decode_partial_utf8_is_replaced_not_raised(gpt2):
    ids = gpt2.encode("日")  # one character, several byte tokens
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert gpt2.decode_bytes(ids) == "日".encode()


def test_with_special_tokens_appends_ids_and_keeps_old_ones(tmp_path, gpt2):
    chat = gpt2.with_special_tokens(["<|im_start|>", "<|im_end|>", EOT])
    assert chat.vocab_size == gpt2.vocab_size + 2
    assert chat.special_tokens[EOT] == gpt2.special_tokens[EOT]
    assert [chat.special_tokens["<|im_start|>"], chat.special_tokens["<|im_end|>"]] == [50257, 50258]
    text = "<|im_start|>user\nHi there<|im_end|>"
    ids = chat.encode(text, allowed_special="all")
    assert ids[0] == 50257 and ids[-1] == 50258 and chat.decode(ids) == text
    assert ids[1:-1] == gpt2.encode("user\nHi there")  # ordinary text keeps its ids
    chat.save(tmp_path / "tok.json")
    assert load_tokenizer(tmp_path / "tok.json").encode(text, allowed_special="all") == ids
    import pytest

    with pytest.raises(ValueError, match="non-empty"):
        gpt2.with_special_tokens([""])
