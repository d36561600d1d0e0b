"""Character-level tokenizer: one id per Unicode character seen in the training text.

The smallest idea of a tokenizer: the vocabulary is the sorted set of characters of a corpus
(65 for tinyshakespeare). A character that was never seen has no id, and what happens then is a
choice you make explicitly: ``unknown="error"`` (the default) raises and names the character;
``unknown="replace"`` maps it to a ``<|unk|>`` special token (which decodes to the text ``<|unk|>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from scratchlm.tokenizers.base import Tokenizer, default_special_tokens

UNK = "<|unk|>"


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(
        self, chars: Sequence[str], special_tokens: dict[str, int] | None = None, unknown: str = "error"
    ):
        if unknown not in ("error", "replace"):
            raise ValueError(f"unknown must be 'error' or 'replace', got {unknown!r}")
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct single characters")
        super().__init__(special_tokens)
        self._check_special_ids(len(chars))
        if unknown == "replace" and UNK not in self.special_tokens:
            raise ValueError(f"unknown='replace' needs a {UNK} special token")
        self.chars = chars
        self.unknown = unknown
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(
        cls, texts: Iterable[str] | str, special_tokens: Iterable[str] = (), unknown: str = "error"
    ) -> CharTokenizer:
        """Vocabulary = the sorted characters of ``texts`` (special tokens get ids after them)."""
        if isinstance(texts, str):
            texts = [texts]
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        chars_sorted = sorted(chars)
        names = list(special_tokens) + ([UNK] if unknown == "replace" else [])
        return cls(chars_sorted, default_special_tokens(len(chars_sorted), names), unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        if self.unknown == "replace":
            unk = self.special_tokens[UNK]
            return [stoi.get(c, unk) for c in text]
        position = next(i for i, c in enumerate(text) if c not in stoi)
        raise ValueError(
            f"character {text[position]!r} (U+{ord(text[position]):04X}) at position {position} is not in this "
            f"character vocabulary of {len(self.chars)} characters; retrain the tokenizer on text that "
            "contains it, or train with unknown='replace' to map unseen characters to <|unk|>"
        )

    def _decode_ordinary(self, ids: Sequence[int]) -> bytes:
        chars = self.chars
        return "".join(chars[i] for i in ids).encode("utf-8")

    def _definition(self) -> dict:
        return {"chars": self.chars, "unknown": self.unknown}

    @classmethod
    def _from_definition(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"], d["special_tokens"], d["unknown"])
