"""decode(encode(x)) == x for arbitrary Unicode, for every tokenizer, special tokens included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

EOT = "<|endoftext|>"
unicode_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",)), max_size=200)


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
    for tok in (CharTokenizer.train(sample, [EOT]), ByteTokenizer.train(special_tokens=[EOT]), shakespeare_bpe):
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
