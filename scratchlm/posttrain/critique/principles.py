"""Principles: a constitution's written rules, read from JSON and checked, and the programmatic checks.

A principle (Bai et al., 2022, *Constitutional AI*) is a rule in words — what the model reads
when it critiques or revises — with a ``check``: how a reply is judged against it. A check is
programmatic (``max_chars``/``min_chars``, ``max_words``/``min_words``, ``forbidden_words``,
``regex``: :func:`check_reply`, exact and free), or asks a critic (``model``, ``scorer``: see
:mod:`scratchlm.posttrain.critique.critics`). :func:`parse_principles` validates a list of them
with :class:`scratchlm.config.Rule` (one rule per field of each kind), naming the principle, the
field, what was expected and what was found. A :class:`Critique` is one reply against one
principle; an :class:`Evaluation` one reply against all of them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from scratchlm.config import Rule

_LENGTH_KINDS = {
    "max_chars": "characters",
    "min_chars": "characters",
    "max_words": "words",
    "min_words": "words",
}


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


# kind -> {field: (what it allows, its default)}; a default of ... means required.
_FIELDS = {
    **{kind: {"limit": (Rule(type=int, min=0), ...)} for kind in _LENGTH_KINDS},
    "forbidden_words": {
        "words": (
            Rule(
                type=list,
                test=lambda v: bool(v) and all(isinstance(w, str) and w.strip() for w in v),
                expected="a non-empty list of non-empty strings",
            ),
            ...,
        ),
        "case_sensitive": (Rule(type=bool), False),
    },
    "regex": {
        "pattern": (Rule(type=str, test=_compiles, expected="a regular expression (a string)"), ...),
        "mode": (
            Rule(
                choices=("fullmatch", "search", "absent"),
                expected='"fullmatch" (the whole reply), "search" (somewhere in it) or "absent" (nowhere in it)',
            ),
            "fullmatch",
        ),
        "hint": (Rule(type=str, expected="a string (the critique when the reply does not conform)"), None),
    },
    "model": {
        "checkpoint": (
            Rule(type=str, expected="a checkpoint folder (default: the starting checkpoint)"),
            None,
        ),
        "pass": (
            Rule(
                type=str,
                test=lambda v: re.fullmatch(r"\w+", v) is not None,
                expected="one word (letters, digits, _) the critique must start with to pass",
            ),
            "yes",
        ),
        "max_tokens": (Rule(type=int, min=1), 16),
    },
    "scorer": {
        "name": (Rule(type=str, test=bool, expected="the name of a scorer given to the run"), ...),
        "threshold": (Rule(type=float, expected="a number (the reply passes at a score >= threshold)"), 0.0),
    },
}


@dataclass
class Principle:
    name: str
    text: str  # the principle in words: what the model reads when it critiques or revises
    check: dict  # {"kind": ..., the kind's fields}, defaults filled in


def parse_principles(data, where: str = "principles") -> list[Principle]:
    """Validate a list of ``{"name", "text", "check": {"kind", ...}}`` and fill in defaults.

    Errors say which principle, which field, what was expected and what was found."""
    shape = '[{"name": ..., "text": ..., "check": {"kind": ..., ...}}, ...]'
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: expected a non-empty JSON list of principles {shape}, got {_short(data)}")
    out, names = [], set()
    for i, p in enumerate(data):
        at = f"{where}: principle {i}"
        if not isinstance(p, dict):
            raise ValueError(f'{at}: expected an object {{"name", "text", "check"}}, got {_short(p)}')
        if set(p) - {"name", "text", "check"} or not {"name", "text", "check"} <= set(p):
            raise ValueError(f"{at}: expected exactly the keys name, text and check, got {sorted(p)}")
        name, text, check = p["name"], p["text"], p["check"]
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"{at}: name must be a word (letters, digits, _ . -), got {_short(name)}")
        at = f"{where}: principle {i} ({name!r})"
        if name in names:
            raise ValueError(
                f"{at}: the name is used twice; names must be unique (results are reported by name)"
            )
        names.add(name)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{at}: text must be a non-empty string (the principle in words), got {_short(text)}"
            )
        if not isinstance(check, dict) or check.get("kind") not in _FIELDS:
            kind = check.get("kind") if isinstance(check, dict) else check
            raise ValueError(
                f"{at}: check must be an object with a kind among {sorted(_FIELDS)}, got kind {_short(kind)}"
            )
        fields = _FIELDS[check["kind"]]
        unknown = sorted(set(check) - set(fields) - {"kind"})
        if unknown:
            raise ValueError(
                f"{at}: check kind {check['kind']!r} has no field(s) {unknown}; its fields: {sorted(fields)}"
            )
        filled = {"kind": check["kind"]}
        for key, (rule, default) in fields.items():
            if key not in check:
                if default is ...:
                    raise ValueError(f"{at}: check kind {check['kind']!r} needs {key!r}: {rule.describe()}")
                filled[key] = default
            else:
                rule.require(check[key], f"{at}: check.{key}", show=_short)
                filled[key] = check[key]
        out.append(Principle(name, text.strip(), filled))
    return out


def load_principles(path: str | Path) -> list[Principle]:
    """Principles from a JSON file (a list of ``{"name", "text", "check"}``); see :func:`parse_principles`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such principles file (a JSON list of {{name, text, check}})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a list of {{name, text, check}}") from None
    return parse_principles(data, str(path))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Critique:
    satisfied: bool
    score: float  # higher is better; 1.0 for a satisfied programmatic or model check
    text: str = ""  # what is wrong (empty when satisfied); a model critic's own words


@dataclass
class Evaluation:
    """One reply against every principle. ``ended``: the reply closed its turn with <|im_end|>;
    a reply cut off by the token budget is unfinished, and complies with nothing as a whole
    (every constitution has this one unwritten rule)."""

    critiques: list[Critique]
    ended: bool = True

    @property
    def complies(self) -> bool:
        return self.ended and all(c.satisfied for c in self.critiques)

    @property
    def key(self) -> tuple[int, float]:
        """Larger is better: (rules satisfied, the end of turn counting as one; total score)."""
        return sum(c.satisfied for c in self.critiques) + self.ended, round(
            sum(c.score for c in self.critiques), 9
        )


def _word_pattern(word: str) -> str:
    """A forbidden word or phrase as a whole: bounded where it starts or ends with a word character
    ("c++" is found in "c++, not", "maybe" not in "maybelline"), its words apart by any whitespace."""
    parts = word.split()
    body = r"\s+".join(re.escape(p) for p in parts)
    start = r"(?<!\w)" if re.match(r"\w", parts[0]) else ""
    end = r"(?!\w)" if re.search(r"\w$", parts[-1]) else ""
    return start + body + end


def check_reply(check: dict, reply: str) -> Critique:
    """A programmatic check of one reply (surrounding whitespace ignored, as the chat template does)."""
    kind, reply = check["kind"], reply.strip()
    if kind in _LENGTH_KINDS:
        unit = _LENGTH_KINDS[kind]
        n, limit = (len(reply) if unit == "characters" else len(reply.split())), check["limit"]
        if kind.startswith("max"):
            ok, score, text = n <= limit, (limit / n if n else 1.0), f"it has {n} {unit}, more than {limit}"
        else:
            ok, score, text = (
                n >= limit,
                (n / limit if limit else 1.0),
                f"it has {n} {unit}, fewer than {limit}",
            )
        return Critique(ok, 1.0 if ok else score, "" if ok else text)
    if kind == "forbidden_words":
        fold = (
            (lambda t: unicodedata.normalize("NFC", t))
            if check["case_sensitive"]
            else (lambda t: unicodedata.normalize("NFC", t).casefold())
        )  # noqa: E731
        text = fold(reply)
        hits = {w: len(re.findall(_word_pattern(fold(w)), text)) for w in check["words"]}
        found = [w for w, n in hits.items() if n]
        count = sum(hits.values())
        return Critique(not found, 1.0 / (1 + count), f"it says {' and '.join(found)}" if found else "")
    if kind == "regex":
        pattern, mode = check["pattern"], check["mode"]
        hit = re.fullmatch(pattern, reply) if mode == "fullmatch" else re.search(pattern, reply)
        ok = bool(hit) if mode != "absent" else not hit
        why = check["hint"] or (
            "its form is wrong"
            if mode == "fullmatch"
            else "it lacks what it must have"
            if mode == "search"
            else "it has what it must not"
        )
        return Critique(ok, float(ok), "" if ok else why)
    raise ValueError(f"check kind {kind!r} is not programmatic (model and scorer checks need a Constitution)")
