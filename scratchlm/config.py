"""Run configuration: TOML files in ``configs/``, overridden from the command line.

A config has a ``[model]`` table (a ``preset`` name and/or any :class:`GPTConfig` field) and a
``[train]`` table (:class:`~scratchlm.train.config.TrainConfig` fields). ``--set a.b=c``
overrides one value; the value is read as TOML (``1e-3``, ``true``, ``"rope"``) and falls back
to a plain string.
"""

from __future__ import annotations

import tomllib
from pathlib import Path


def dataclass_from_dict(cls, values: dict, section: str):
    """Build a config dataclass, naming any key it does not have (a typo fails loudly)."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown [{section}] keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set expects section.key=value (e.g. train.lr=1e-3), got {item!r}")
        dotted, value = item.split("=", 1)
        *sections, key = dotted.strip().split(".")
        node = config
        for s in sections:
            node = node.setdefault(s, {})
        node[key] = parse_value(value.strip())
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    config: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    config = apply_overrides(config, list(overrides))
    unknown = set(config) - {"model", "train"}
    if unknown:
        raise ValueError(f"config sections must be [model] and [train]; found {sorted(unknown)}")
    return config
