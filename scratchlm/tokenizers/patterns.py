"""Regex pre-tokenization patterns for byte-level BPE.

Before BPE runs, text is cut into chunks ("pre-tokens") by a regular expression; merges never
cross a chunk boundary. That is why " the" and "the" are different tokens, and why digits, spaces
and punctuation stay apart from words. The three patterns below are those of GPT-2, GPT-4
(``cl100k_base``) and GPT-4o (``o200k_base``).

They are written with possessive quantifiers (``++``, ``?+``) and a ``\\s++$`` fast path, the
forms tiktoken uses: they cut text exactly as the original patterns do, but can never backtrack
catastrophically, so pre-tokenization stays linear on inputs such as a million spaces.
"""

from __future__ import annotations

import functools

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "o200k": O200K_PATTERN}


def resolve_pattern(name_or_regex: str) -> str:
    """``"gpt2" | "cl100k" | "o200k"`` -> the pattern; anything else is taken as a custom regex."""
    pattern = PATTERNS.get(name_or_regex, name_or_regex)
    try:
        compile_pattern(pattern)
    except regex.error as e:
        raise ValueError(
            f"pre-tokenization pattern {name_or_regex!r} is neither one of {sorted(PATTERNS)} "
            f"nor a valid regex ({e})"
        ) from None
    return pattern


@functools.lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def pattern_name(pattern: str) -> str:
    """The short name of a built-in pattern, or ``"custom"``."""
    for name, p in PATTERNS.items():
        if p == pattern:
            return name
    return "custom"
