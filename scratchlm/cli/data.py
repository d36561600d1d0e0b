"""``scratchlm data``: prepare corpora (normalize, split, manifest) and encode them into token shards."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit


def _source_names():
    from scratchlm.downloads import SOURCES

    return [*SOURCES, "stdlib"]


class Prepare(Command):
    path = ("data", "prepare")
    help = "normalize, split 90/5/5, check leakage, write a manifest"

    def register(self, q):
        source = q.add_argument(
            "source", help="a named source (%(registry)s), or a text file, folder, or .jsonl"
        )
        source.registry = flags.Registry(_source_names)
        flags.out(q, "the prepared dataset folder (default: data/<name>)", required=False)
        q.add_argument(
            "--fractions", default="0.9,0.05,0.05", help="train,val,test fractions (val or test may be 0)"
        )
        flags.seed(q)
        q.add_argument(
            "--documents", choices=["whole", "lines"], help="a text file is one document, or one per line"
        )
        q.add_argument("--text-field", default="text", help="field holding the text in a .jsonl file")
        flags.errors(q)
        q.add_argument("--no-nfc", action="store_true", help="skip Unicode NFC normalization")
        q.add_argument(
            "--clean-whitespace", action="store_true", help="strip trailing spaces, collapse blank-line runs"
        )
        q.add_argument(
            "--max-bytes",
            type=flags.positive_int,
            help="read at most about this many bytes (stdlib, folders)",
        )
        q.add_argument(
            "--force", action="store_true", help="prepare again even if the manifest says it is up to date"
        )
        q.add_argument(
            "--no-download", action="store_true", help="never download; use the cache or SCRATCHLM_LOCAL_DATA"
        )
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.data import prepare_dataset

        try:
            fractions = tuple(float(f) for f in args.fractions.split(","))
        except ValueError:
            raise ValueError(
                f"--fractions {args.fractions!r}: expected three numbers train,val,test, e.g. 0.9,0.05,0.05"
            ) from None
        name = args.source if not Path(args.source).exists() else Path(args.source).stem
        out = Path(args.out) if args.out else Path("data") / name
        start = time.perf_counter()
        ds, written = prepare_dataset(
            args.source,
            out,
            fractions=fractions,
            seed=args.seed,
            documents=args.documents,
            text_field=args.text_field,
            errors=args.errors,
            nfc=not args.no_nfc,
            clean_whitespace=args.clean_whitespace,
            max_bytes=args.max_bytes,
            force=args.force,
            download=not args.no_download,
        )
        m = ds.manifest
        payload = {"path": str(ds.path), "written": written, "seconds": time.perf_counter() - start, **m}
        lines = [
            f"{'prepared' if written else 'up to date (same input and options, checksums match)'}: {ds.path}",
            f"source: {m['source']['kind']} {m['source']['name']}  sha256 {m['source']['sha256'][:16]}...",
            f"normalization: {json.dumps({k: v for k, v in m['normalization'].items() if v})}",
            f"duplicates: {m['duplicates']['duplicate_copies']} duplicate copies; leakage check: "
            f"{m['leakage']['shared_documents']} shared documents",
        ]
        for split, e in m["splits"].items():
            lines.append(
                f"  {split:<5} {e['documents']:>7,} docs {e['characters']:>11,} chars  "
                f"sha256 {e['sha256'][:16]}..."
            )
        empty = [split for split in ("val", "test") if not m["splits"][split]["documents"]]
        if empty:
            print(
                f"scratchlm: note: no {' and no '.join(empty)} split (--fractions {args.fractions}): "
                "training cannot measure validation loss on this dataset, nor eval a held-out split",
                file=sys.stderr,
            )
        emit(args, payload, "\n".join(lines))


class Tokenize(Command):
    path = ("data", "tokenize")
    help = "encode every split into .bin token shards, on all cores"

    def register(self, q):
        flags.dataset(q)
        flags.tokenizer(q, required=True)
        flags.out(q, "the shards folder (default: <dataset>/<tokenizer name>)", required=False)
        q.add_argument(
            "--workers",
            type=flags.positive_int,
            help="parallel workers: threads for tiktoken-backed BPE, else processes (default: every core)",
        )
        flags.output(q)

    def run(self, args):
        from scratchlm.data import tokenize_dataset
        from scratchlm.tokenizers import resolve_tokenizer_path

        summary = tokenize_dataset(
            args.dataset,
            resolve_tokenizer_path(args.tokenizer),
            args.out,
            args.workers,
            progress=flags.show_progress(args),
        )
        lines = [
            f"shards in {summary['path']} (dtype {summary['dtype']}, "
            f"tokenizer {summary['tokenizer_fingerprint'][:16]})"
        ]
        for split, e in summary["splits"].items():
            lines.append(
                f"  {split:<5} {e['tokens']:>10,} tokens  {e['bytes_per_token']:.3f} bytes/token  "
                f"{e['bytes'] / max(e['seconds'], 1e-9) / 1e6:.2f} MB/s"
            )
        emit(args, summary, "\n".join(lines))


class Sources(Command):
    path = ("data", "sources")
    help = "list the named sources, their addresses and checksums"

    def register(self, q):
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.downloads import SOURCES

        payload = {
            name: {"file": s.filename, "url": s.url, "sha256": s.sha256, "description": s.description}
            for name, s in SOURCES.items()
        }
        text = "\n".join(
            f"{n:<13} {s.description}\n{'':<13} {s.url}\n{'':<13} sha256 {s.sha256}"
            for n, s in SOURCES.items()
        )
        emit(
            args,
            payload,
            text + "\nlocal: stdlib (this Python's standard library), or any file, folder or .jsonl path",
        )
