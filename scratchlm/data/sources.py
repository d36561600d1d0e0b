"""Where raw text comes from: canonical downloads (checksummed and cached) and local corpora.

Named sources (``shakespeare``, ``names``, GPT-2's tokenizer files) are fetched from their
canonical addresses and verified against a known sha256, so every user trains on the same bytes.
Lookup order for a named file:

1. the cache (``$SCRATCHLM_CACHE``, default ``~/.cache/scratchlm``), if the checksum matches;
2. folders listed in ``$SCRATCHLM_LOCAL_DATA`` (``os.pathsep``-separated): an offline mirror;
3. a download from the canonical address.

Without a network and without a mirror the error says where to put the file.

Local sources: ``stdlib`` (the ``.py`` files of this Python's standard library: an offline corpus
that is always there), a text file, a folder of text files, or a ``.jsonl`` file with a text field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.data.normalize import decode_utf8
from scratchlm.io import atomic_write, sha256_file


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    url: str
    sha256: str
    description: str
    documents: str = "whole"  # how a text file splits into documents: "whole" or "lines"


SOURCES: dict[str, RemoteFile] = {
    "shakespeare": RemoteFile(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "1,115,394 bytes of Shakespeare plays (char-rnn's tinyshakespeare)",
    ),
    "names": RemoteFile(
        "names.txt",
        "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
        "32,033 first names, one per line (makemore)",
        documents="lines",
    ),
    "gpt2-encoder": RemoteFile(
        "encoder.json",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        "GPT-2's token -> id map",
    ),
    "gpt2-vocab": RemoteFile(
        "vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        "GPT-2's 50,000 BPE merges",
    ),
}


class SourceUnavailable(RuntimeError):
    """A named source could not be found locally nor downloaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("SCRATCHLM_CACHE") or Path.home() / ".cache" / "scratchlm")


def _local_mirrors() -> list[Path]:
    value = os.environ.get("SCRATCHLM_LOCAL_DATA", "")
    return [Path(p) for p in value.split(os.pathsep) if p]


def fetch(name: str, download: bool = True, timeout: float = 30.0) -> Path:
    """Path to the verified local copy of the named source file (see module doc for the order)."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    spec = SOURCES[name]
    target = cache_dir() / spec.filename
    if target.exists() and sha256_file(target) == spec.sha256:
        return target
    for mirror in _local_mirrors():
        for candidate in (mirror / spec.filename, mirror / "gpt2" / spec.filename):
            if candidate.is_file() and sha256_file(candidate) == spec.sha256:
                with open(candidate, "rb") as src, atomic_write(target) as dst:
                    shutil.copyfileobj(src, dst)
                return target
    problem = "downloads are disabled"
    if download:
        try:
            digest = hashlib.sha256()
            with urllib.request.urlopen(spec.url, timeout=timeout) as response, atomic_write(target) as dst:
                while block := response.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
                if digest.hexdigest() != spec.sha256:
                    raise SourceUnavailable(
                        f"{spec.url} returned bytes with sha256 {digest.hexdigest()}, expected {spec.sha256}; "
                        "the file at that address has changed or the download was corrupted"
                    )
            return target
        except SourceUnavailable:
            raise
        except Exception as e:  # no network, DNS failure, HTTP error...
            problem = f"downloading {spec.url} failed ({type(e).__name__}: {e})"
    raise SourceUnavailable(
        f"{name}: {problem}. Without a network, put {spec.filename} (sha256 {spec.sha256}) at {target}, "
        f"or point SCRATCHLM_LOCAL_DATA at a folder that holds it."
    )


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
        return info, _split_documents(decode(data, str(path)), str(path), documents or remote.documents), counts
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
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
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
