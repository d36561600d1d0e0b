"""Run configuration: TOML files in ``configs/``, overridden from the command line, validated.

A config has a ``[model]`` table (a ``preset`` name and/or any :class:`GPTConfig` field) and a
``[train]`` table (:class:`~scratchlm.train.config.TrainConfig` fields). ``--set a.b=c``
overrides one value; the value is read as TOML (``1e-3``, ``true``, ``"rope"``) and falls back
to a plain string (so ``--set train.out_dir=2024-06-01`` is a folder name, not a date).

Every value is checked when the config dataclass is built: its type (from the field's
annotation) and its range or choices (from the class's table of :class:`Rule`), and a bad one is
refused with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class Rule:
    """What a value allows: the one validation helper of config fields, sampling parameters and
    principles' checks. A config field's type comes from its annotation (``validate``); a value
    checked on its own names its ``type``. ``test`` checks what bounds cannot say (a pattern that
    compiles), and ``expected`` then says it in words."""

    min: float | None = None  # inclusive
    max: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    choices: tuple | None = None
    why: str = ""  # a few words on what the field means, for the message
    type: type | None = None  # int (never a bool), float (any real number, never NaN), bool, str or list
    test: Callable[[Any], bool] | None = None  # anything else the value must pass
    expected: str = ""  # what the value must be, in words, where the bounds cannot say it

    def describe(self) -> str:
        if self.expected:
            return self.expected
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        bounds = " and ".join(parts)
        kind = _VALUE_NAMES.get(self.type, "")
        return f"{kind} {bounds}".strip()

    def allows(self, value) -> bool:
        if self.type is not None and not _has_type(value, self.type):
            return False
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        bounds = (self.min, self.max, self.above, self.below)
        if bounds != (None,) * 4 and not isinstance(value, (int, float)):
            return False
        if not (
            (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
            and (self.above is None or value > self.above)
            and (self.below is None or value < self.below)
        ):
            return False
        return self.test is None or bool(self.test(value))

    def require(self, value, name: str, *, show=repr) -> None:
        """Raise ``ValueError("<name> must be <what the rule allows> (<why>), got <value>")`` unless
        the rule allows ``value``: the message of a value checked on its own (a sampling parameter,
        a field of a principle), where :func:`validate` words a config table's."""
        if not self.allows(value):
            why = f" ({self.why})" if self.why else ""
            raise ValueError(f"{name} must be {self.describe()}{why}, got {show(value)}")


_VALUE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _has_type(value, kind: type) -> bool:
    """Whether ``value`` is a ``kind``, strictly: a bool is no integer and no number, NaN is no number."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and value == value
    return isinstance(value, kind)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _types_of(annotation) -> tuple[tuple[type, ...], bool]:
    """(allowed types, whether None is allowed) of an annotation like ``int``, ``float | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (annotation,), False


def _coerce(value, allowed: tuple[type, ...]):
    """The value as the field's type, or raise TypeError. An int is a fine float; a bool is not an int."""
    for t in allowed:
        if typing.get_origin(t) is list:  # list[str]: a list whose items all have that type
            (item,) = typing.get_args(t)
            if isinstance(value, list) and all(
                isinstance(v, item) and not isinstance(v, bool) for v in value
            ):
                return list(value)
    allowed = tuple(t for t in allowed if typing.get_origin(t) is None)
    if isinstance(value, bool):
        if bool in allowed:
            return value
        raise TypeError
    if isinstance(value, int) and int not in allowed and float in allowed:
        return float(value)
    if isinstance(value, (int, float)) and str in allowed and not (int in allowed or float in allowed):
        return str(value)  # out_dir = 2024 names a folder "2024"
    if isinstance(value, tuple(t for t in allowed if t is not bool)):
        return value
    raise TypeError


def validate(obj, section: str, rules: dict[str, Rule]) -> None:
    """Check (and normalise: int -> float) every field of a config dataclass instance, in place."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{section}.{f.name}"
        allowed, optional = _types_of(hints[f.name])
        rule = rules.get(f.name)
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{key} = null: expected {_TYPE_NAMES.get(allowed[0], allowed[0].__name__)}")
        sub = next((t for t in allowed if dataclasses.is_dataclass(t)), None)
        if sub is not None:  # a block kind's own table, e.g. [model.moe]: built (and checked) by its class
            if isinstance(value, dict):
                value = dataclass_from_dict(sub, value, key)
            elif not isinstance(value, sub):
                raise ConfigError(f"{key} = {value!r}: expected a table of {sub.__name__} fields")
            object.__setattr__(obj, f.name, value)
            continue
        try:
            value = _coerce(value, allowed)
        except TypeError:
            expected = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in allowed) + (
                " (or absent)" if optional else ""
            )
            found = type(value).__name__
            hint = (
                " (TOML read it as a date: quote it)"
                if isinstance(value, (datetime.date, datetime.time))
                else ""
            )
            raise ConfigError(f"{key} = {value!r}: expected {expected}, found {found}{hint}") from None
        if rule is not None and not rule.allows(value):
            why = f" ({rule.why})" if rule.why else ""
            raise ConfigError(f"{key} = {value!r}: must be {rule.describe()}{why}")
        object.__setattr__(obj, f.name, value)


def dataclass_from_dict(cls, values: dict, section: str):
    """Build a config dataclass, naming any key it does not have (a typo fails loudly)."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table of key = value pairs, found {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown [{section}] keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def parse_value(text: str):
    """A ``--set`` value read as TOML; anything TOML reads as a date or time stays the text typed."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if isinstance(value, (datetime.date, datetime.time)) else value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set expects section.key=value (e.g. train.lr=1e-3), got {item!r}")
        dotted, value = item.split("=", 1)
        *sections, key = dotted.strip().split(".")
        node = config
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {s} is a value, not a section")
        node[key] = parse_value(value.strip())
    return config


def load_config(
    path: str | Path | None, overrides: list[str] = (), aliases: dict[str, str] | None = None
) -> dict:
    """A TOML config file with ``--set section.key=value`` overrides applied.

    ``aliases`` maps a key's old dotted path to its new one (``model.sliding_window`` ->
    ``model.attn.window``): old spellings, in the file or in ``--set``, are renamed first, each with
    one notice, so that an override in either spelling replaces the file's value as it always did."""
    import warnings

    config: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    aliases = aliases or {}
    used = []
    for old, new in aliases.items():
        *sections, key = old.split(".")
        node = config
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            value = node.pop(key)
            used.append(old)
            *new_sections, new_key = new.split(".")
            target = config
            for s in new_sections:
                target = target.setdefault(s, {})
            if new_key in target:
                raise ConfigError(f"{old} is the old spelling of {new}, and both are set: keep {new}")
            target[new_key] = value
    renamed = []
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if sep and dotted.strip() in aliases:
            used.append(dotted.strip())
            item = f"{aliases[dotted.strip()]}={value}"
        renamed.append(item)
    if used:
        moves = ", ".join(f"{old} -> {aliases[old]}" for old in dict.fromkeys(used))
        warnings.warn(f"deprecated config keys, renamed: {moves}", FutureWarning, stacklevel=2)
    config = apply_overrides(config, renamed)
    unknown = set(config) - {"model", "train"}
    if unknown:
        raise ConfigError(f"config sections must be [model] and [train]; found {sorted(unknown)}")
    return config
