"""Where raw text comes from: named corpora (checksummed downloads, see ``scratchlm.downloads``)
and local corpora.

Local sources: ``stdlib`` (the ``.py`` files of this Python's standard library: an offline corpus
that is always there), a text file, a folder of text files, or a ``.jsonl`` file with a text field.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.data.normalize import decode_utf8
from scratchlm.downloads import SOURCES, fetch


@dataclass
class SourceInfo:
    """What a corpus was made from; recorded in the dataset manifest."""

    kind: str  # named | stdlib | file | folder | jsonl
    name: str
    sha256: str  # of the raw input: a file's bytes, or a folder's (path, sha256) list
    paths: list[str] = field(default_factory=list)
    url: str | None = None
    raw_bytes: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Document:
    name: str
    text: str


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".json", ".html", ".csv", ".tex", ""}


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """This Python's standard library ``.py`` files in a fixed (sorted) order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for p in files:
        if total >= max_bytes:
            break
        chosen.append(p)
        total += p.stat().st_size
    return chosen


def read_source(
    spec: str,
    *,
    documents: str | None = None,
    text_field: str = "text",
    errors: str = "strict",
    max_bytes: int | None = None,
    download: bool = True,
) -> tuple[SourceInfo, list[Document], dict]:
    """Read a corpus. Returns (what it was, its documents, decoding counts).

    ``spec`` is a named source, ``stdlib``, or a path. ``documents`` ("whole" or "lines") says how a
    text file splits into documents. ``errors="strict"`` makes invalid UTF-8 an error that names the
    file and byte offset; ``"replace"`` substitutes U+FFFD and counts it.
    """
    counts = {"bom_removed": 0, "invalid_sequences_replaced": 0}

    def decode(data: bytes, name: str) -> str:
        text, bom, replaced = decode_utf8(data, name, errors)
        counts["bom_removed"] += bom
        counts["invalid_sequences_replaced"] += replaced
        return text

    if spec in SOURCES:
        remote = SOURCES[spec]
        path = fetch(spec, download=download)
        data = path.read_bytes()
        info = SourceInfo("named", spec, remote.sha256, [str(path)], remote.url, len(data))
        return (
            info,
            _split_documents(decode(data, str(path)), str(path), documents or remote.documents),
            counts,
        )
    if spec == "stdlib":
        files = stdlib_files(max_bytes)
        root = Path(sysconfig.get_paths()["stdlib"])
        return _read_files("stdlib", "stdlib", files, root, decode, counts)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{spec!r} is neither a named source ({', '.join(sorted(SOURCES))}), nor 'stdlib', nor an existing path"
        )
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"{path}: folder has no text files (looked for {sorted(TEXT_SUFFIXES - {''})})")
        return _read_files("folder", path.name, files, path, decode, counts)
    data = path.read_bytes()
    info = SourceInfo("file", path.name, hashlib.sha256(data).hexdigest(), [str(path)], None, len(data))
    if path.suffix.lower() == ".jsonl":
        info.kind = "jsonl"
        return info, _read_jsonl(data, str(path), text_field, decode), counts
    return info, _split_documents(decode(data, str(path)), str(path), documents or "whole"), counts


def _read_files(kind, name, files, root, decode, counts):
    listing = hashlib.sha256()
    docs, total = [], 0
    for p in files:
        data = p.read_bytes()
        rel = p.relative_to(root).as_posix()
        listing.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        docs.append(Document(rel, decode(data, str(p))))
        total += len(data)
    info = SourceInfo(kind, name, listing.hexdigest(), [str(root)], None, total)
    return info, docs, counts


def _split_documents(text: str, name: str, mode: str) -> list[Document]:
    if mode == "whole":
        return [Document(name, text)]
    if mode == "lines":
        # Only the line terminator goes (\n, \r\n or \r); normalization later counts lines that end up
        # empty. Not str.splitlines(): U+2028, U+0085 and friends are text inside a line here.
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [Document(f"{name}:{i + 1}", line) for i, line in enumerate(lines)]
    raise ValueError(f"documents must be 'whole' or 'lines', got {mode!r}")


def _read_jsonl(data: bytes, name: str, text_field: str, decode) -> list[Document]:
    docs = []
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line_start = offset
        offset += len(raw) + 1
        if not raw.strip():
            continue
        line = decode(raw, f"{name} line {lineno} (file byte offset {line_start})")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ValueError(
                f"{name} line {lineno}: expected an object with a string field {text_field!r}; "
                f"use --text-field to name the field that holds the text"
            )
        docs.append(Document(f"{name}:{lineno}", obj[text_field]))
    return docs
