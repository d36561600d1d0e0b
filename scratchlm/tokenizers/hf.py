"""Our tokenizers in Hugging Face form, so ``transformers`` users can load and chat with a model.

:func:`save_hf_tokenizer` writes ``tokenizer.json`` (built with the ``tokenizers`` library, never
by hand) and ``tokenizer_config.json``; ``AutoTokenizer.from_pretrained(folder)`` then encodes
exactly as we do, special tokens included, and a chat tokenizer carries the chat template as
Jinja, so ``apply_chat_template`` renders the ids :class:`~scratchlm.tokenizers.chat.ChatTemplate`
renders (``tests/tokenizers/test_chat.py`` checks both).

How each kind maps:

* **byte-level BPE**: a ``BPE`` model whose vocabulary spells each token's bytes with GPT-2's
  byte-to-character table, the merges in rank order (HF applies merges by priority, tiktoken by
  the merged token's rank; merge ``i`` creating rank ``256 + i`` makes them the same), our regex
  as a ``Split`` pre-tokenizer followed by the byte-level mapping;
* **byte**: the same with no merges and no regex;
* **char**: a ``BPE`` model over the characters with no merges (a word falls apart into its
  characters) and a decoder that joins them back. A character outside the vocabulary becomes
  ``<|unk|>`` for a tokenizer trained with ``unknown="replace"``; with the default
  ``unknown="error"`` we refuse such text, but Hugging Face has no "refuse", and drops it.
"""

from __future__ import annotations

import json
from pathlib import Path

from scratchlm.io import atomic_write
from scratchlm.tokenizers.base import ENDOFTEXT, Tokenizer
from scratchlm.tokenizers.chat import CHAT_TOKENS, IM_END, JINJA_TEMPLATE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte as a printable character (printable ASCII and Latin-1 as
    themselves, the rest shifted past 255), so a byte string becomes a readable string."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def oniguruma_pattern(pattern: str) -> str:
    r"""Our pattern in the regex dialect of ``tokenizers`` (Oniguruma, Ruby syntax).

    Python's ``regex`` reads ``\p{N}{1,3}+`` (cl100k's digit rule) as *possessive* ``{1,3}``;
    Oniguruma reads ``{n,m}+`` as ``(?:{n,m})+``, any number of digits, and would keep
    ``12345678`` whole where tiktoken cuts ``123|456|78``. Here the plain ``{1,3}`` is the same
    match (nothing after it could give digits back), so the ``+`` is dropped."""
    return pattern.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def to_hf_tokenizer(tokenizer: Tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes and decodes as ``tokenizer`` does."""
    try:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise RuntimeError(
            "writing a Hugging Face tokenizer needs the tokenizers package: pip install tokenizers"
        ) from None
    kind = tokenizer.kind
    if kind in ("bpe", "byte"):
        table = bytes_to_unicode()
        spell = lambda token: "".join(table[b] for b in token)  # noqa: E731
        if kind == "bpe":
            vocab_bytes, merges = tokenizer.vocab, tokenizer.merges
        else:
            vocab_bytes, merges = [bytes([b]) for b in range(256)], []
        vocab = {spell(t): i for i, t in enumerate(vocab_bytes)}
        hf = HFTokenizer(
            models.BPE(
                vocab=vocab, merges=[(spell(vocab_bytes[a]), spell(vocab_bytes[b])) for a, b in merges]
            )
        )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        if kind == "bpe":
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(oniguruma_pattern(tokenizer.pattern)), behavior="isolated"),
                    byte_level,
                ]
            )
        else:
            hf.pre_tokenizer = byte_level
        hf.decoder = decoders.ByteLevel()
    elif kind == "char":
        # The special tokens sit in the vocabulary at their ids (<|unk|> must, to be the unknown token).
        vocab = {**{c: i for i, c in enumerate(tokenizer.chars)}, **tokenizer.special_tokens}
        unk = "<|unk|>" if tokenizer.unknown == "replace" else None
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
        hf.decoder = decoders.Fuse()
    else:
        raise ValueError(f"no Hugging Face form for a {kind!r} tokenizer")
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, i in specials:  # added tokens take the next free ids: ours must be exactly those
        if hf.token_to_id(name) != i:
            raise ValueError(
                f"special token {name!r} would get id {hf.token_to_id(name)} in Hugging Face form, not {i}"
            )
    return hf


def save_hf_tokenizer(
    tokenizer: Tokenizer, folder: str | Path, *, model_max_length: int | None = None
) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (with the chat template
    and <|im_end|> as end of sequence when the tokenizer has the chat tokens)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = to_hf_tokenizer(tokenizer)
    chat = all(t in tokenizer.special_tokens for t in CHAT_TOKENS)
    specials = tokenizer.special_tokens
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "bos_token": None,
        "eos_token": IM_END if chat else (ENDOFTEXT if ENDOFTEXT in specials else None),
        "pad_token": ENDOFTEXT if ENDOFTEXT in specials else None,
        "unk_token": "<|unk|>" if getattr(tokenizer, "unknown", None) == "replace" else None,
        "model_max_length": model_max_length or 10**30,
        "added_tokens_decoder": {
            str(i): {
                "content": name,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for name, i in specials.items()
        },
    }
    if chat:
        config["chat_template"] = JINJA_TEMPLATE
    with atomic_write(folder / "tokenizer.json", "w") as f:
        f.write(hf.to_str())
    with atomic_write(folder / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    return folder
