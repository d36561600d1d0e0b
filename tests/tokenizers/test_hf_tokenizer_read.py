"""Hugging Face ``tokenizer.json`` read back as ours (``scratchlm.tokenizers.hf.read_hf_tokenizer``):
every kind we write (char, byte, BPE, BPE with Qwen2's NFC normalizer, a chat tokenizer with its
special tokens) and GPT-2's own file give the same ids as the tokenizer they came from and as
``transformers``' ``AutoTokenizer``; a kind we cannot reproduce is refused by name (Qwen's and Llama
3's own forms, imported through the CLI, are in ``tests/models/test_hf_export_import.py``)."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from scratchlm.tokenizers import BPETokenizer, gpt2_tokenizer, train_tokenizer  # noqa: E402
from scratchlm.tokenizers.chat import ChatTemplate, add_chat_tokens  # noqa: E402
from scratchlm.tokenizers.hf import UnreadableTokenizer, read_hf_tokenizer, save_hf_tokenizer  # noqa: E402

BOS = {
    "type": "TemplateProcessing",
    "single": [
        {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {
        "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [300], "tokens": ["<|begin_of_text|>"]}
    },
}
CORPUS = ["First Citizen:\nBefore we proceed any further, hear me speak.\n", "All: Speak, speak. 1234 café\n"]
TEXTS = ["First, hear me speak.\n", "speak 1234567 café cafe\u0301", "  two  spaces\n\nand\tabs", ""]


def _nfc(bpe: BPETokenizer) -> BPETokenizer:
    """``bpe`` with Qwen2's NFC normalizer."""
    return BPETokenizer(bpe.vocab, bpe.merges, bpe.pattern, bpe.special_tokens, normalizer="NFC")


def _tokenizers():
    return {
        "char": train_tokenizer("char", CORPUS),
        "char-unk": train_tokenizer("char", CORPUS, unknown="replace"),
        "byte": train_tokenizer("byte", CORPUS),
        "bpe": train_tokenizer("bpe", CORPUS * 20, vocab_size=300),
        "bpe-cl100k": train_tokenizer("bpe", CORPUS * 20, vocab_size=290, pattern="cl100k"),
        "chat-byte": add_chat_tokens(train_tokenizer("byte", CORPUS)),
        "chat-bpe": add_chat_tokens(train_tokenizer("bpe", CORPUS * 20, vocab_size=300)),
        "bpe-nfc": _nfc(train_tokenizer("bpe", CORPUS * 20, vocab_size=300, pattern="cl100k")),
    }


@pytest.mark.parametrize("name", list(_tokenizers()))
def test_an_exported_tokenizer_reads_back_with_the_same_ids(tmp_path, name):
    ours = _tokenizers()[name]
    save_hf_tokenizer(ours, tmp_path)
    back = read_hf_tokenizer(tmp_path)
    assert (back.kind, back.special_tokens, back.vocab_size) == (
        ours.kind,
        ours.special_tokens,
        ours.vocab_size,
    )
    assert back.fingerprint == ours.fingerprint  # the same tokenizer, not merely the same ids here
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [t for t in TEXTS if name != "char" or set(t) <= set(ours.chars)]
    for text in texts:
        ids = ours.encode(text)
        assert back.encode(text) == ids == theirs.encode(text)
        assert back.decode(ids) == ours.decode(ids)
    if name.startswith("chat"):
        messages = [{"role": "user", "content": "speak 12"}, {"role": "assistant", "content": "hear me"}]
        assert ChatTemplate(back).render(messages).ids == ChatTemplate(ours).render(messages).ids


def test_gpt2s_own_tokenizer_json_reads_with_gpt2s_ids(tmp_path):
    """GPT-2's tokenizer.json as on the Hub (a BPE from OpenAI's files, ByteLevel with its built-in
    regex for pre-tokenizer, post-processor and decoder, <|endoftext|> added at 50256), built offline."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from scratchlm.downloads import fetch

    hf = Tokenizer(models.BPE.from_file(str(fetch("gpt2-encoder", False)), str(fetch("gpt2-vocab", False))))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    back = read_hf_tokenizer(tmp_path / "tokenizer.json")
    reference = gpt2_tokenizer(download=False)
    assert back.fingerprint == reference.fingerprint and back.special_tokens == {"<|endoftext|>": 50256}
    for text in TEXTS + ["Hello world, it's 2024!  The   end\n", "naïve ü 東京 🙂 <|endoftext|>"]:
        assert back.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())
        assert back.encode(text, allowed_special="all") == hf.encode(text).ids


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["model"].update(type="WordPiece"), "a WordPiece tokenizer"),
        (lambda d: d.update(normalizer={"type": "NFKC"}), "a NFKC normalizer cannot be read"),
        (lambda d: d["model"]["merges"].reverse(), "does not create id 256"),
        (lambda d: d["model"].update(byte_fallback=True), "a BPE with byte_fallback"),
        (  # Llama 3's: the BOS inside a Sequence after ByteLevel
            lambda d: d.update(
                post_processor={"type": "Sequence", "processors": [{"type": "ByteLevel"}, BOS]}
            ),
            r"a post-processor that adds \['<\|begin_of_text\|>'\] to every text",
        ),
        (
            lambda d: d.update(normalizer={"type": "NFC"}) or d["added_tokens"][0].update(normalized=True),
            "the added token '<|endoftext|>' with normalized cannot be read",
        ),
    ],
    ids=[
        "wordpiece",
        "nfkc-normalizer",
        "merges-out-of-rank",
        "byte-fallback",
        "bos-template",
        "normalized-added",
    ],
)
def test_a_kind_we_cannot_reproduce_is_refused_by_name(tmp_path, change, message):
    """Refused with UnreadableTokenizer (``model import`` warns and keeps the weights on it)."""
    save_hf_tokenizer(train_tokenizer("bpe", CORPUS * 20, vocab_size=300), tmp_path)
    d = json.loads((tmp_path / "tokenizer.json").read_text())
    change(d)
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(UnreadableTokenizer, match=message):
        read_hf_tokenizer(tmp_path)
