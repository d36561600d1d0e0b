"""Our tokenizers in Hugging Face form, so ``transformers`` users can load and chat with a model,
and Hugging Face ``tokenizer.json`` files read back as ours.

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

:func:`read_hf_tokenizer` reads the other way (``model import`` keeps a folder's tokenizer with
the weights): the three kinds above as we write them, and GPT-2's own ``tokenizer.json`` (a
byte-level BPE whose ``ByteLevel`` pre-tokenizer carries GPT-2's regex), and Qwen2's and Qwen3's form
(an NFC normalizer, their own regex as a ``Split``, then ``ByteLevel``; added tokens, special or not,
become our special tokens). A byte-level BPE reads only when merge ``i`` creates id ``256 + i`` with
the 256 bytes first (true of GPT-2's, Qwen2's and ours): our encoder ranks tokens by id, Hugging Face
merges by the merge list, and only then do they agree. Anything else (WordPiece, Unigram, another
normalizer, SentencePiece's byte fallback, a post-processor that adds a BOS token as Llama 3's does,
a BPE with other ranks) raises :class:`UnreadableTokenizer` naming what it is: a model with a
tokenizer we cannot reproduce exactly is better without one than with a tokenizer that gives other
ids (``model import`` then keeps the weights and warns).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from scratchlm.io import atomic_write
from scratchlm.tokenizers.base import ENDOFTEXT, Tokenizer
from scratchlm.tokenizers.chat import CHAT_TOKENS, IM_END, JINJA_TEMPLATE
from scratchlm.tokenizers.patterns import GPT2_PATTERN, PATTERNS


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
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
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
        if getattr(tokenizer, "normalizer", None) == "NFC":
            hf.normalizer = normalizers.NFC()
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


# --- reading a Hugging Face tokenizer.json ---------------------------------------------------------
READABLE = (
    "scratchlm reads byte-level BPE (GPT-2's kind, and Qwen2's with its NFC normalizer), "
    "byte and character tokenizers"
)


class UnreadableTokenizer(ValueError):
    """A ``tokenizer.json`` scratchlm cannot reproduce exactly; ``reason`` says what it is."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; {READABLE}")
        self.path, self.reason = path, reason


def read_hf_tokenizer(path: str | Path) -> Tokenizer:
    """Our tokenizer for a Hugging Face ``tokenizer.json`` (``path``, or a folder holding one), ids
    identical to it; a kind we cannot reproduce exactly raises :class:`UnreadableTokenizer`, naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnreadableTokenizer(path, f"not a readable tokenizer.json ({e})") from None
    try:
        return _read(d, lambda what: UnreadableTokenizer(path, what))
    except UnreadableTokenizer:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # FormatError included
        raise UnreadableTokenizer(path, f"a malformed tokenizer.json ({type(e).__name__}: {e})") from None


def _read(d: dict, refuse) -> Tokenizer:
    """:func:`read_hf_tokenizer` on the parsed JSON; ``refuse(reason)`` makes the exception to raise."""
    model = d.get("model") or {}
    kind = model.get("type")

    if kind != "BPE":
        raise refuse(f"a {kind} tokenizer (model.type) cannot be read")
    if model.get("byte_fallback"):
        raise refuse("a BPE with byte_fallback (SentencePiece's kind) cannot be read")
    normalizer = (d.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise refuse(f"a {normalizer} normalizer cannot be read (NFC can)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise refuse(f"a BPE with {key} = {model[key]!r} cannot be read")
    post = d.get("post_processor") or {}
    for step in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
        # ByteLevel's post-processor only moves offsets; the others add tokens to every text.
        if step.get("type") == "TemplateProcessing" and step.get("special_tokens"):
            raise refuse(
                f"a post-processor that adds {sorted(step['special_tokens'])} to every text cannot be read "
                "(scratchlm's tokenizers add no tokens of their own)"
            )
        if step.get("type") not in (None, "ByteLevel", "TemplateProcessing"):
            raise refuse(f"a {step.get('type')} post-processor cannot be read")
    # Added tokens are cut out of the raw text before anything else runs, special or not; we keep
    # them all as special tokens. One matched after normalizing, or with its own whitespace rules,
    # would cut text otherwise than our special tokens do.
    added = d.get("added_tokens", [])
    for t in added:
        rules = [key for key in ("lstrip", "rstrip", "single_word") if t.get(key)]
        if normalizer and t.get("normalized", not t.get("special", False)):
            rules.append("normalized")
        if rules:
            raise refuse(f"the added token {t.get('content')!r} with {', '.join(rules)} cannot be read")
    specials = {t["content"]: t["id"] for t in added}
    vocab = {token: i for token, i in model.get("vocab", {}).items() if token not in specials}
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    by_id = sorted((i, token) for token, i in vocab.items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise refuse("a vocabulary whose ids are not 0..n-1 before the special tokens cannot be read")
    tokens = [token for _, token in by_id]
    decoder = (d.get("decoder") or {}).get("type")
    if decoder == "Fuse" and not merges and d.get("pre_tokenizer") is None and not normalizer:
        from scratchlm.tokenizers.char import UNK, CharTokenizer

        if any(len(token) != 1 for token in tokens):
            raise refuse("a character vocabulary with multi-character tokens cannot be read")
        unknown = "replace" if model.get("unk_token") == UNK else "error"
        return CharTokenizer(tokens, specials, unknown)
    if decoder != "ByteLevel":
        raise refuse(f"a BPE with a {decoder} decoder (not byte-level) cannot be read")
    pattern = _byte_level_pattern(d.get("pre_tokenizer"), refuse)
    spelled = {token: i for i, token in enumerate(tokens)}
    table = bytes_to_unicode()
    if pattern is None and not merges and not normalizer and spelled == {table[b]: b for b in range(256)}:
        from scratchlm.tokenizers.byte import ByteTokenizer

        return ByteTokenizer(specials)
    if pattern is None:
        raise refuse("a byte-level BPE without a pre-tokenization regex cannot be read")
    from scratchlm.tokenizers.bpe import BPETokenizer, str_to_token

    ours = []
    for rank, (left, right) in enumerate(merges):
        if spelled.get(left + right) != 256 + rank:
            raise refuse(
                f"merge {rank} ({left!r} + {right!r}) does not create id {256 + rank}: a BPE ranked "
                "otherwise than by id cannot be read"
            )
        ours.append((spelled[left], spelled[right]))
    vocab_bytes = [str_to_token(token) for token in tokens]
    return BPETokenizer(vocab_bytes, ours, pattern, specials, normalizer=normalizer)


def _byte_level_pattern(pre: dict | None, refuse) -> str | None:
    """Our pre-tokenization regex for a byte-level pre-tokenizer: a ``Split`` regex followed by
    ``ByteLevel`` (as we write it), or ``ByteLevel`` with its built-in regex (GPT-2's); None for a
    ``ByteLevel`` without a regex."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    if not steps or steps[-1] is None or steps[-1].get("type") != "ByteLevel":
        raise refuse(f"a BPE pre-tokenizer {pre and pre.get('type')!r} that is not byte-level cannot be read")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise refuse("a byte-level pre-tokenizer with add_prefix_space cannot be read")
    if len(steps) == 1:
        return GPT2_PATTERN if byte_level.get("use_regex", True) else None
    split = steps[0]
    if (
        len(steps) != 2
        or split.get("type") != "Split"
        or byte_level.get("use_regex", True)
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in split.get("pattern", {})
    ):
        raise refuse(f"the pre-tokenizer sequence {[step.get('type') for step in steps]} cannot be read")
    regex = split["pattern"]["Regex"]
    known = {oniguruma_pattern(p): p for p in PATTERNS.values()}
    if regex in known:
        return known[regex]
    if re.search(r"\{\d+(,\d*)?\}\+", regex):  # {n,m}+ means different things in Oniguruma and Python's regex
        raise refuse(f"the pre-tokenization regex {regex!r} cannot be read exactly")
    return regex
