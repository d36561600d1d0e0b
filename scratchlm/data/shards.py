"""Token shards: a split encoded once into a flat binary file of ids, read back through memmap.

Layout of ``train.bin`` / ``val.bin`` / ``test.bin`` (little-endian):

====== ======= =====================================================
offset size    field
====== ======= =====================================================
0      8       magic ``b"SLMTOKS\\0"``
8      4       format version (1)
12     4       bytes per id: 2 (uint16, vocabularies up to 65,536) or 4 (uint32)
16     8       number of ids
24     4       tokenizer vocabulary size
28     32      tokenizer fingerprint (raw sha256 of its definition)
60     4       reserved (zero)
64     ...     the ids
====== ======= =====================================================

The loader checks every field: a shard made by another tokenizer is refused with both
fingerprints named, and a truncated file is caught from its size.

Documents are joined with the tokenizer's ``<|endoftext|>`` id between them (when it has one),
so the model learns where one document ends and the next begins.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import regex

from scratchlm.data.prepare import SPLITS, Dataset
from scratchlm.io import atomic_write, fsync_dir, read_json, sha256_file, write_json
from scratchlm.tokenizers import ENDOFTEXT, Tokenizer, load_tokenizer
from scratchlm.tokenizers.patterns import PATTERNS

MAGIC = b"SLMTOKS\0"
SHARD_VERSION = 1
HEADER = struct.Struct("<8sIIQI32s4x")
assert HEADER.size == 64


class ShardError(ValueError):
    """A token shard is corrupt, truncated, or was made by a different tokenizer."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: str | Path, ids: np.ndarray, tokenizer: Tokenizer) -> Path:
    """Write ``ids`` with a header for ``tokenizer``, atomically."""
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ValueError(f"ids outside 0..{tokenizer.vocab_size - 1} cannot be written for this tokenizer")
    header = HEADER.pack(
        MAGIC,
        SHARD_VERSION,
        dtype.itemsize,
        ids.size,
        tokenizer.vocab_size,
        bytes.fromhex(tokenizer.fingerprint),
    )
    with atomic_write(path) as f:
        f.write(header)
        f.write(ids.astype(dtype.newbyteorder("<"), copy=False).tobytes())
    return Path(path)


def read_shard_header(path: str | Path) -> dict:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ShardError(
            f"{path}: {size} bytes is too short for a token shard header ({HEADER.size} bytes); the file is truncated"
        )
    magic, version, itemsize, count, vocab_size, fingerprint = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path}: not a scratchlm token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != SHARD_VERSION:
        raise ShardError(
            f"{path}: shard format version {version}, this scratchlm reads {SHARD_VERSION}; re-tokenize"
        )
    if itemsize not in (2, 4):
        raise ShardError(f"{path}: {itemsize} bytes per id is not 2 or 4; the header is corrupt")
    expected = HEADER.size + count * itemsize
    if size != expected:
        raise ShardError(
            f"{path}: header says {count} ids ({expected} bytes) but the file has {size} bytes; "
            "the shard is truncated or corrupt: run `scratchlm data tokenize` again"
        )
    return {
        "version": version,
        "itemsize": itemsize,
        "count": count,
        "vocab_size": vocab_size,
        "fingerprint": fingerprint.hex(),
    }


def open_shard(path: str | Path, tokenizer: Tokenizer | None = None) -> np.memmap:
    """Memory-map a shard's ids; with ``tokenizer``, refuse a shard that another tokenizer made."""
    header = read_shard_header(path)
    if tokenizer is not None and header["fingerprint"] != tokenizer.fingerprint:
        raise ShardError(
            f"{path} was made by tokenizer {header['fingerprint'][:16]} (vocabulary {header['vocab_size']}), "
            f"but the tokenizer given is {tokenizer.fingerprint[:16]} (vocabulary {tokenizer.vocab_size}); "
            "re-tokenize the data with this tokenizer or use the tokenizer the shard was made with"
        )
    dtype = np.dtype("<u2") if header["itemsize"] == 2 else np.dtype("<u4")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(header["count"],))


# --- tokenizing a corpus on every core ----------------------------------------------------

_BOUNDARY = regex.compile(r"(?<=[\p{L}\p{N}]\n)(?=\S)")


def split_for_workers(text: str, tokenizer: Tokenizer, piece_chars: int) -> list[str]:
    """Cut a long document into pieces whose encodings concatenate to the whole's encoding.

    Char and byte tokenizers can be cut anywhere. BPE can be cut where its pattern always ends a
    chunk: for the built-in patterns, right after a newline that follows a letter or digit and
    comes before a non-space. A custom pattern is never cut.
    """
    if len(text) <= piece_chars:
        return [text]
    if tokenizer.kind in ("char", "byte"):
        return [text[i : i + piece_chars] for i in range(0, len(text), piece_chars)]
    if getattr(tokenizer, "pattern", None) not in PATTERNS.values():
        return [text]
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        match = _BOUNDARY.search(text, start + piece_chars)
        if not match:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_pieces(pieces: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tokenizer.encode_ordinary(p), dtype=np.int64) for p in pieces]


def encode_documents(
    docs: list[str],
    tokenizer: Tokenizer,
    tokenizer_path: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    piece_chars: int = 1 << 18,
) -> np.ndarray:
    """Encode documents (joined by ``<|endoftext|>`` where the tokenizer has it) into one id array.

    With ``num_workers > 1`` pieces are encoded in parallel: in threads when the tokenizer's
    encoder releases the GIL (BPE on tiktoken), else in worker processes that load
    ``tokenizer_path``. The result is identical to encoding in this process.
    """
    # Work items are (document index, piece); small documents are batched so that each task
    # sent to a worker process is worth its overhead.
    batches: list[list[tuple[int, str]]] = [[]]
    size = 0
    for i, doc in enumerate(docs):
        for piece in split_for_workers(doc, tokenizer, piece_chars):
            if size >= piece_chars:
                batches.append([])
                size = 0
            batches[-1].append((i, piece))
            size += len(piece)
    workers = min(num_workers or os.cpu_count() or 1, len(batches))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=sum(len(d) for d in docs), unit="char", unit_scale=True, desc="tokenizing", disable=not progress
    )
    per_doc: list[list[np.ndarray]] = [[] for _ in docs]

    def collect(batch: list[tuple[int, str]], arrays: list[np.ndarray]) -> None:
        for (i, _), ids in zip(batch, arrays):
            per_doc[i].append(ids)
        bar.update(sum(len(p) for _, p in batch))

    def encode_batch(batch: list[tuple[int, str]]) -> list[np.ndarray]:
        return [np.asarray(tokenizer.encode_ordinary(p), dtype=np.int64) for _, p in batch]

    if workers > 1 and tokenizer.releases_gil:
        # tiktoken encodes without holding the GIL: threads use every core with no start-up cost.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            for batch, arrays in zip(batches, pool.map(encode_batch, batches)):
                collect(batch, arrays)
    elif workers > 1 and tokenizer_path is not None:
        # Pure-Python encoders hold the GIL: use processes, each loading the tokenizer file once.
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            for batch, arrays in zip(batches, pool.map(_encode_pieces, [[p for _, p in b] for b in batches])):
                collect(batch, arrays)
    else:
        for batch in batches:
            collect(batch, encode_batch(batch))
    bar.close()
    eot = tokenizer.eot_token
    parts: list[np.ndarray] = []
    for k, arrays in enumerate(per_doc):
        if k and eot is not None:
            parts.append(np.asarray([eot], dtype=np.int64))
        parts.extend(arrays)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


SHARDS_FORMAT = "scratchlm.shards"


def tokenize_dataset(
    dataset: str | Path | Dataset,
    tokenizer_path: str | Path,
    out_dir: str | Path | None = None,
    num_workers: int | None = None,
    progress: bool = False,
) -> dict:
    """Encode every split of a prepared dataset into ``train.bin`` / ``val.bin`` / ``test.bin``.

    The shards go to ``out_dir`` (default: ``<dataset>/<tokenizer file stem>``) with a copy of the
    tokenizer and a ``shards.json`` summary. Returns that summary.
    """
    import shutil
    import time

    ds = dataset if isinstance(dataset, Dataset) else Dataset.load(dataset)
    tokenizer_path = Path(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    out = Path(out_dir) if out_dir else ds.path / tokenizer_path.stem
    if tokenizer.eot_token is None:
        multi = {s: e["documents"] for s, e in ds.manifest["splits"].items() if e["documents"] > 1}
        if multi:
            raise ValueError(
                f"{tokenizer_path} has no {ENDOFTEXT} token, but {ds.path} has several documents per split "
                f"({multi}): without a separator the shards would glue documents together. Train the tokenizer "
                f"with its default special token (`scratchlm tokenizer train` adds {ENDOFTEXT} unless --no-special)"
            )
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "format": SHARDS_FORMAT,
        "version": 1,
        "dataset": str(ds.path),
        "dataset_source_sha256": ds.manifest["source"]["sha256"],
        "tokenizer": "tokenizer.json",
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype_for_vocab(tokenizer.vocab_size).name,
        "splits": {},
    }
    # The shards form a set: every new file is first written under a pending name, and only when all
    # exist is the set switched: the old shards.json withdrawn (durably), the files renamed in, the
    # new shards.json written last. A failure while writing leaves the old set as it was; a kill
    # while switching leaves a folder without shards.json, which says "tokenizing did not finish".
    files = [f"{split}.bin" for split in SPLITS] + ["tokenizer.json"]
    pending = {name: out / f".{name}.pending" for name in files}
    for path in pending.values():  # left by a run killed while writing
        path.unlink(missing_ok=True)
    try:
        for split in SPLITS:
            docs = ds.documents(split)
            start = time.perf_counter()
            ids = encode_documents(docs, tokenizer, tokenizer_path, num_workers, progress)
            seconds = time.perf_counter() - start
            write_shard(pending[f"{split}.bin"], ids, tokenizer)
            n_bytes = ds.manifest["splits"][split]["bytes"]
            summary["splits"][split] = {
                "file": f"{split}.bin",
                "tokens": int(ids.size),
                "bytes": n_bytes,
                "bytes_per_token": n_bytes / max(ids.size, 1),
                "seconds": seconds,
                "sha256": sha256_file(pending[f"{split}.bin"]),
            }
        with open(tokenizer_path, "rb") as src, atomic_write(pending["tokenizer.json"]) as dst:
            shutil.copyfileobj(src, dst)
    except BaseException:
        for path in pending.values():
            path.unlink(missing_ok=True)
        raise
    (out / "shards.json").unlink(missing_ok=True)
    fsync_dir(out)
    for name, path in pending.items():
        os.replace(path, out / name)
    fsync_dir(out)
    write_json(out / "shards.json", summary)  # last: it only ever describes a complete set
    summary["path"] = str(out)
    return summary


def verify_shards(folder: str | Path, tokenizer: Tokenizer | None = None, splits=None) -> dict:
    """Check a shards folder before training on it: complete, and every shard as it was written.

    ``shards.json`` is written last by :func:`tokenize_dataset`, so its absence means tokenizing
    never finished. Each shard's header is checked (magic, version, size, tokenizer) and its
    sha256 compared with the one recorded, which catches a flipped bit anywhere in the ids (the
    cost: one read of each file, about a second per GB). ``splits``: check only these (an
    evaluation reads val and test, not the training shard).
    """
    folder = Path(folder)
    if not (folder / "shards.json").exists():
        raise ShardError(
            f"{folder}: no shards.json, so tokenizing did not finish (or this is not a shards folder); "
            "run `scratchlm data tokenize` again"
        )
    summary = read_json(folder / "shards.json", SHARDS_FORMAT)
    unknown = sorted(set(splits or ()) - set(summary["splits"]))
    if unknown:
        raise ShardError(
            f"{folder}: no split(s) {unknown} in shards.json (it has {sorted(summary['splits'])})"
        )
    for split, entry in summary["splits"].items():
        if splits is not None and split not in splits:
            continue
        path = folder / entry["file"]
        if not path.exists():
            raise ShardError(
                f"{path}: missing (listed in {folder / 'shards.json'}); run `scratchlm data tokenize` again"
            )
        header = read_shard_header(path)
        if tokenizer is not None and header["fingerprint"] != tokenizer.fingerprint:
            open_shard(path, tokenizer)  # raises, naming both tokenizers
        if "sha256" in entry and sha256_file(path) != entry["sha256"]:
            raise ShardError(
                f"{path}: sha256 differs from the one recorded in shards.json; the file changed or is "
                "corrupt: run `scratchlm data tokenize` again"
            )
    return summary
