"""Text normalization: make raw text predictable, and say exactly what changed.

Two strings that look identical can differ in bytes: a byte-order mark at the start, Windows
``\\r\\n`` line ends, or "é" written as one code point (U+00E9) or two (``e`` + U+0301). A model
would see them as different tokens, and duplicates would slip past the leakage check. So:

* bytes are decoded as UTF-8 (a BOM is removed); invalid UTF-8 is an error naming the file and
  byte offset, unless you ask for replacement (U+FFFD, counted);
* Unicode is brought to NFC (composed) form;
* ``\\r\\n`` and lone ``\\r`` become ``\\n``;
* optionally (``clean_whitespace``): trailing spaces on lines are stripped, runs of 3+ newlines
  become 2, and leading/trailing blank space of the document goes.

Nothing is ever dropped silently: every change is counted in a :class:`NormalizationReport`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import regex

BOM = "\ufeff"
_TRAILING_SPACE = regex.compile(r"[ \t]+(?=\n)|[ \t]+\Z")
_BLANK_RUNS = regex.compile(r"\n{3,}")


class InvalidUTF8(ValueError):
    pass


def decode_utf8(data: bytes, name: str, errors: str = "strict") -> tuple[str, int, int]:
    """Decode ``data``; returns (text, BOMs removed, invalid bytes replaced)."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    try:
        text = data.decode("utf-8")
        replaced = 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise InvalidUTF8(
                f"{name}: invalid UTF-8 at byte offset {e.start} (bytes {data[e.start : e.end + 3]!r}); "
                "fix the file, or pass --errors replace to substitute U+FFFD and count the replacements"
            ) from None
        text = data.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    bom = 0
    if text.startswith(BOM):
        text, bom = text[1:], 1
    return text, bom, replaced


def read_text_file(path: str | Path, errors: str = "strict") -> str:
    """A UTF-8 text file's text (a leading BOM dropped); invalid UTF-8 fails naming the file and the
    byte offset of the first bad byte, or with ``errors="replace"`` becomes U+FFFD."""
    return decode_utf8(Path(path).read_bytes(), str(path), errors)[0]


@dataclass
class NormalizationReport:
    documents_in: int = 0
    documents_out: int = 0
    empty_documents_skipped: int = 0
    crlf_to_lf: int = 0
    cr_to_lf: int = 0
    nfc_changed_documents: int = 0
    nfc_characters_delta: int = 0
    trailing_whitespace_stripped: int = 0
    blank_line_runs_collapsed: int = 0
    characters_in: int = 0
    characters_out: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_text(
    text: str, report: NormalizationReport, *, nfc: bool = True, clean_whitespace: bool = False
) -> str:
    """Normalize one document, adding what changed to ``report``."""
    report.characters_in += len(text)
    if "\r" in text:
        crlf = text.count("\r\n")
        report.crlf_to_lf += crlf
        text = text.replace("\r\n", "\n")
        report.cr_to_lf += text.count("\r")
        text = text.replace("\r", "\n")
    if nfc and not unicodedata.is_normalized("NFC", text):
        composed = unicodedata.normalize("NFC", text)
        report.nfc_changed_documents += 1
        report.nfc_characters_delta += len(composed) - len(text)
        text = composed
    if clean_whitespace:
        text, n = _TRAILING_SPACE.subn("", text)
        report.trailing_whitespace_stripped += n
        text, n = _BLANK_RUNS.subn("\n\n", text)
        report.blank_line_runs_collapsed += n
        stripped = text.strip()
        if stripped != text:
            report.trailing_whitespace_stripped += 1
        text = stripped
    report.characters_out += len(text)
    return text
