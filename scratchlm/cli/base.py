"""What every command shares: the ``Command`` shape (register its flags, run) and the report.

Every command that reports numbers takes ``--json`` and then prints exactly one JSON object on
stdout (progress bars go to stderr); under torchrun only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path


class Command:
    """One command. ``path`` is how it is typed after ``scratchlm`` (``("data", "prepare")``),
    ``register`` adds its flags (shared ones from :mod:`scratchlm.cli.flags`), ``run`` calls the
    API and prints. ``runs_model``: the command runs a model forward, so it takes ``--device``."""

    path: tuple[str, ...] = ()
    help: str = ""
    runs_model: bool = False

    def register(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's flags to its parser."""

    def run(self, args: argparse.Namespace) -> None:
        raise NotImplementedError


def emit(args, payload: dict, text: str) -> None:
    """Print the report: ``payload`` as one JSON object with ``--json``, else ``text``."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one report: rank 0's
        return
    if getattr(args, "json", False):
        print(json.dumps(finite(payload), indent=1, default=str))
    else:
        print(text)


def finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def load_tokenizer(spec: str):
    """The tokenizer a ``--tokenizer`` names (a JSON file, or gpt2)."""
    from scratchlm.tokenizers import load_tokenizer, resolve_tokenizer_path

    return load_tokenizer(resolve_tokenizer_path(spec))


def check_writable(path: str | Path, flag: str) -> Path:
    """Refuse an output path that cannot be written, before the work that would fill it: the
    nearest existing folder above it must be a folder in which a file can be made (tried, then
    removed: permissions and read-only mounts both answer). Missing folders in between
    are made by the write itself."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder: give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=f".{path.name}.check."):
            pass
    except OSError as e:
        raise OSError(
            f"{flag} {path}: cannot write in {parent} ({e.strerror}); choose another {flag}"
        ) from None
    return path
