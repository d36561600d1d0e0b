"""Prepare a dataset: normalize, split train/val/test by document, check leakage, write a manifest.

Splits are made **by document**: a document is never cut across splits, and documents are dealt
out in a shuffled order fixed by ``seed``. A corpus that is a single document (tinyshakespeare)
is split into contiguous chunks instead, train first and test last, as nanoGPT does.

Leakage: if the same document (after normalization) sits in two splits, validation numbers are
measured on training data. Exact duplicates are therefore grouped before splitting, so every copy
lands in the same split, and :func:`check_leakage` verifies the result; it fails loudly if a
split ever shares a document with another.

The output folder holds ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (one ``{"text": ...}``
per document) and ``manifest.json``: the source and its sha256, the sha256 and counts of every
split, the options, and the normalization report. Preparing the same input with the same options
again is a no-op, detected by those checksums.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from scratchlm.data.normalize import NormalizationReport, normalize_text
from scratchlm.data.sources import read_source
from scratchlm.io import FormatError, atomic_write, read_json, sha256_file, write_json

DATASET_FORMAT = "scratchlm.dataset"
DATASET_VERSION = 1
SPLITS = ("train", "val", "test")


class LeakageError(RuntimeError):
    """The same document appears in two splits."""


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_leakage(splits: dict[str, list[str]]) -> dict:
    """Raise :class:`LeakageError` if any exact document is in two splits; else return a report."""
    owner: dict[str, str] = {}
    shared: dict[str, int] = {}
    examples: list[str] = []
    within = 0
    for split, docs in splits.items():
        seen_here: set[str] = set()
        for text in docs:
            h = doc_hash(text)
            if h in seen_here:
                within += 1
                continue
            seen_here.add(h)
            if h in owner and owner[h] != split:
                key = f"{owner[h]}/{split}"
                shared[key] = shared.get(key, 0) + 1
                if len(examples) < 3:
                    examples.append(text[:60])
            owner.setdefault(h, split)
    if shared:
        raise LeakageError(
            f"data leakage: documents shared between splits {shared} (for example {examples!r}); "
            "evaluation on these splits would measure memorized training text"
        )
    return {"checked": True, "shared_documents": 0, "duplicates_within_splits": within}


def split_documents(
    texts: list[str], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[str]]:
    """Deal documents into train/val/test; copies of one document always share a split."""
    if len(texts) == 1:  # one document: cut by characters; a split given no characters has no document
        text = texts[0]
        n1 = int(len(text) * fractions[0])
        n2 = int(len(text) * (fractions[0] + fractions[1]))
        pieces = {"train": text[:n1], "val": text[n1:n2], "test": text[n2:]}
        return {split: [piece] if piece else [] for split, piece in pieces.items()}
    groups: dict[str, list[str]] = {}
    for text in texts:
        groups.setdefault(doc_hash(text), []).append(text)
    order = sorted(groups)  # sorted first, so the shuffle depends on the seed alone
    random.Random(seed).shuffle(order)
    total = len(texts)
    bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
    assigned: dict[str, list[str]] = {s: [] for s in SPLITS}  # split -> group hashes
    placed = 0
    for h in order:
        split = "train" if placed < bounds[0] else "val" if placed < bounds[1] else "test"
        assigned[split].append(h)
        placed += len(groups[h])
    # A split that asks for a share gets at least one group, taken from the end of the one before.
    for split, before, fraction in (("val", "train", fractions[1]), ("test", "val", fractions[2])):
        if fraction > 0 and not assigned[split]:
            donor = before if len(assigned[before]) > 1 else "train"
            if len(assigned[donor]) > 1:
                assigned[split].append(assigned[donor].pop())
    return {s: [t for h in assigned[s] for t in groups[h]] for s in SPLITS}


def _split_stats(docs: list[str]) -> dict:
    return {
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "bytes": sum(len(d.encode("utf-8")) for d in docs),
    }


def _jsonl_bytes(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")


@dataclass
class Dataset:
    """A prepared dataset folder: read its manifest and (checksum-verified) documents."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(
                f"{path}: no manifest.json; this is not a prepared dataset (run `scratchlm data prepare` first)"
            )
        return cls(path, read_json(manifest_path, DATASET_FORMAT, (DATASET_VERSION,)))

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def documents(self, split: str) -> list[str]:
        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.path}: no split {split!r}; it has {sorted(self.manifest['splits'])}")
        entry = self.manifest["splits"][split]
        data = (self.path / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise FormatError(
                f"{self.path / entry['file']}: sha256 does not match the manifest; the file was modified or "
                "corrupted: prepare the dataset again"
            )
        # json.dumps escapes "\n" and "\r" inside strings, so records are separated by "\n" alone;
        # str.splitlines() would also split inside documents at U+2028, U+2029, U+0085, \x1c-\x1e...
        lines = data.decode("utf-8").split("\n")
        return [json.loads(line)["text"] for line in lines if line]

    def text(self, split: str) -> str:
        return "".join(self.documents(split))


def prepare_dataset(
    source: str,
    out_dir: str | Path,
    *,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 1337,
    documents: str | None = None,
    text_field: str = "text",
    errors: str = "strict",
    nfc: bool = True,
    clean_whitespace: bool = False,
    max_bytes: int | None = None,
    force: bool = False,
    download: bool = True,
) -> tuple[Dataset, bool]:
    """Prepare ``source`` into ``out_dir``. Returns (dataset, whether anything was written)."""
    if (
        len(fractions) != 3
        or any(f < 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-9
        or fractions[0] <= 0
    ):
        raise ValueError(
            f"split fractions must be three non-negative numbers summing to 1 with train > 0, got {fractions}"
        )
    out_dir = Path(out_dir)
    info, docs, decode_counts = read_source(
        source,
        documents=documents,
        text_field=text_field,
        errors=errors,
        max_bytes=max_bytes,
        download=download,
    )
    options = {
        "fractions": list(fractions),
        "seed": seed,
        "documents": documents,
        "text_field": text_field,
        "errors": errors,
        "nfc": nfc,
        "clean_whitespace": clean_whitespace,
        "max_bytes": max_bytes,
    }
    if not force and _up_to_date(out_dir, info.sha256, options):
        return Dataset.load(out_dir), False

    report = NormalizationReport(documents_in=len(docs))
    texts = []
    for doc in docs:
        text = normalize_text(doc.text, report, nfc=nfc, clean_whitespace=clean_whitespace)
        if text:
            texts.append(text)
        else:
            report.empty_documents_skipped += 1
    report.documents_out = len(texts)
    if not texts:
        raise ValueError(
            f"{source}: no text left after normalization ({report.documents_in} empty documents)"
        )
    distinct = len({doc_hash(t) for t in texts})
    splits = split_documents(texts, fractions, seed)
    leakage = check_leakage(splits)

    manifest = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "name": out_dir.name,
        "source": info.to_dict(),
        "options": options,
        "decoding": decode_counts,
        "normalization": report.to_dict(),
        "duplicates": {
            "documents": len(texts),
            "distinct": distinct,
            "duplicate_copies": len(texts) - distinct,
        },
        "leakage": leakage,
        "splits": {},
    }
    for split in SPLITS:
        data = _jsonl_bytes(splits[split])
        with atomic_write(out_dir / f"{split}.jsonl") as f:
            f.write(data)
        manifest["splits"][split] = {
            "file": f"{split}.jsonl",
            "sha256": hashlib.sha256(data).hexdigest(),
            **_split_stats(splits[split]),
        }
    write_json(out_dir / "manifest.json", manifest)  # last: a manifest only ever describes complete files
    return Dataset(out_dir, manifest), True


def _up_to_date(out_dir: Path, source_sha: str, options: dict) -> bool:
    try:
        manifest = read_json(out_dir / "manifest.json", DATASET_FORMAT, (DATASET_VERSION,))
    except (FileNotFoundError, FormatError):
        return False
    if manifest["source"]["sha256"] != source_sha or manifest["options"] != options:
        return False
    return all(
        (out_dir / e["file"]).exists() and sha256_file(out_dir / e["file"]) == e["sha256"]
        for e in manifest["splits"].values()
    )
