"""The one interface every tokenizer shares, and the single-file JSON format they are saved in.

A tokenizer turns text into a list of integer ids and back. Every tokenizer here has:

* ``encode(text, allowed_special=..., disallowed_special=...)`` with tiktoken's semantics for
  special tokens: text that spells a special token (say ``<|endoftext|>``) is an error unless
  that token is allowed, in which case it becomes the special id; ``encode_ordinary`` treats
  everything as plain text;
* ``encode_batch``, ``decode``, ``decode_bytes``, ``vocab_size`` and ``special_tokens``;
* ``save(path)`` / :func:`load_tokenizer` to one versioned JSON file, and a ``fingerprint``
  (sha256 of that definition) that token shards and checkpoints record, so data made with one
  tokenizer is never read with another.
"""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import regex

from scratchlm.io import FormatError, write_json

TOKENIZER_FORMAT = "scratchlm.tokenizer"
TOKENIZER_VERSION = 1
ENDOFTEXT = "<|endoftext|>"
# Every trainer adds these unless told otherwise (``special_tokens=[]``): shards separate documents
# with <|endoftext|>, so a tokenizer without it cannot tokenize multi-document data.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT,)

SpecialSet = Literal["all"] | Collection[str]


class Tokenizer(ABC):
    """Base class: subclasses implement ordinary (special-free) encoding and decoding of bytes."""

    kind: str = "abstract"
    releases_gil: bool = False  # True when encoding runs outside the GIL, so threads scale

    def __init__(self, special_tokens: dict[str, int] | None = None):
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self._special_by_id = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}

    # --- what subclasses provide -------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are ``0 .. vocab_size-1``)."""

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating any special-token spelling as plain text."""

    @abstractmethod
    def _decode_ordinary(self, ids: Sequence[int]) -> bytes:
        """Bytes of a run of non-special ids."""

    @abstractmethod
    def _definition(self) -> dict:
        """Everything needed to rebuild this tokenizer (without format/version keys)."""

    @classmethod
    @abstractmethod
    def _from_definition(cls, d: dict) -> Tokenizer: ...

    # --- special tokens, the tiktoken way ----------------------------------------------
    @property
    def eot_token(self) -> int | None:
        """Id of ``<|endoftext|>`` (document separator), or None if this tokenizer has none."""
        return self.special_tokens.get(ENDOFTEXT)

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
    ) -> list[int]:
        """Encode ``text``; special-token spellings follow tiktoken's rules (see module doc)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names tokens this tokenizer does not have: {sorted(unknown)}")
        disallowed = (
            set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        )
        if disallowed:
            match = _special_regex(tuple(sorted(disallowed))).search(text)
            if match:
                raise ValueError(
                    f"text contains the special token {match.group()!r} at character {match.start()}, "
                    f"which is not allowed. Pass allowed_special={{{match.group()!r}}} (or 'all') to "
                    "encode it as its special id, or disallowed_special=() to encode it as plain text."
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in _special_regex(tuple(sorted(allowed))).finditer(text):
            ids.extend(self.encode_ordinary(text[start : match.start()]))
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    def encode_batch(self, texts: Iterable[str], **kwargs) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
        """The UTF-8 bytes of ``ids``. A special token decodes to its spelling (``<|endoftext|>``)
        unless ``skip_special``: then it contributes no bytes, as when counting bytes of *text*
        (bits per byte: a document separator is not 13 bytes of text)."""
        out: list[bytes] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_by_id:
                if run:
                    out.append(self._decode_ordinary(run))
                    run = []
                if not skip_special:
                    out.append(self._special_by_id[i])
            else:
                if not 0 <= i < self.vocab_size:
                    raise ValueError(
                        f"token id {i} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})"
                    )
                run.append(i)
        if run:
            out.append(self._decode_ordinary(run))
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text. Ids that end mid-character decode to U+FFFD unless ``errors="strict"``."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # --- files ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": TOKENIZER_FORMAT,
            "version": TOKENIZER_VERSION,
            "type": self.kind,
            "special_tokens": self.special_tokens,
            **self._definition(),
        }

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical definition: equal fingerprints mean identical ids."""
        if not hasattr(self, "_fingerprint"):
            canonical = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
        return self._fingerprint

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, self.to_dict(), indent=None)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special_tokens={sorted(self.special_tokens)})"

    def with_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        """A new tokenizer with ``names`` added as special tokens after every existing id (the ones it
        already has keep their ids, so every id a model learned keeps its meaning)."""
        new = [n for n in dict.fromkeys(names) if n not in self.special_tokens]
        if not all(isinstance(n, str) and n for n in new):
            raise ValueError(f"special tokens must be non-empty strings, got {new!r}")
        d = self._definition()
        d["special_tokens"] = {**self.special_tokens, **default_special_tokens(self.vocab_size, new)}
        return type(self)._from_definition(d)

    def _check_special_ids(self, first_free_id: int) -> None:
        """Special ids must sit after the ordinary vocabulary, one id each."""
        ids = sorted(self.special_tokens.values())
        if ids != list(range(first_free_id, first_free_id + len(ids))):
            raise FormatError(
                f"special token ids {ids} must be consecutive from {first_free_id} (right after the ordinary vocabulary)"
            )


@functools.lru_cache(maxsize=64)
def _special_regex(tokens: tuple[str, ...]) -> regex.Pattern:
    # Longest first, so that one special token that prefixes another never wins wrongly.
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def default_special_tokens(first_id: int, names: Iterable[str]) -> dict[str, int]:
    return {name: first_id + i for i, name in enumerate(dict.fromkeys(names))}


def check_model_tokenizer(
    tokenizer: Tokenizer, *, rows: int, fingerprint: str | None, model: str, source: str, fix: str
) -> None:
    """Refuse a tokenizer that is not the model's, before any work (sampling with another vocabulary
    gives garbage, or an index error halfway through).

    ``rows``: the model's embedding rows; ``fingerprint``: the tokenizer the model was trained with,
    as its checkpoint records it (``None`` for an imported model); ``model`` and ``source`` name the
    two in the message, and ``fix`` says what to do instead. A recorded fingerprint decides: equal
    fingerprints mean identical ids. Without one, the tokenizer may not have more ids than the model
    has rows; fewer is allowed only then (an imported table padded past its tokenizer, as GPT-2's
    50,257 ids are often padded to 50,304 rows).
    """
    if fingerprint is not None and tokenizer.fingerprint != fingerprint:
        raise ValueError(
            f"{source} ({tokenizer.kind}, {tokenizer.vocab_size} ids, fingerprint {tokenizer.fingerprint[:12]}) "
            f"is not the tokenizer {model} was trained with ({rows} embedding rows, fingerprint "
            f"{fingerprint[:12]}): {fix}"
        )
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"{source} ({tokenizer.kind}) has {tokenizer.vocab_size} ids but {model} has only {rows} "
            f"embedding rows: it is not this model's tokenizer; {fix}"
        )
