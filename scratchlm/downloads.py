"""Named files fetched from their canonical addresses: checksummed, cached, or read from a mirror.

The named sources (``shakespeare``, ``names``, GPT-2's tokenizer files) are verified against a
known sha256, so every user trains on the same bytes. Lookup order for a named file:

1. the cache (``$SCRATCHLM_CACHE``, default ``~/.cache/scratchlm``), if the checksum matches;
2. folders listed in ``$SCRATCHLM_LOCAL_DATA`` (``os.pathsep``-separated): an offline mirror;
3. a download from the canonical address.

Without a network and without a mirror the error says where to put the file. This is plumbing
every stage may use (the GPT-2 tokenizer needs its files as the data stage needs its corpora).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
