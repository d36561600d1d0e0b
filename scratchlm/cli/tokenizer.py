"""``scratchlm tokenizer``: train a tokenizer, encode and decode with one, compare kinds and sizes."""

from __future__ import annotations

import argparse
import sys
import time

from scratchlm.cli import flags
from scratchlm.cli.base import Command, check_writable, emit, load_tokenizer


def _kinds():
    from scratchlm.tokenizers import KINDS

    return KINDS


def _patterns():
    from scratchlm.tokenizers.patterns import PATTERNS

    return PATTERNS


def _source(q, dataset: str, text_file: str) -> None:
    """``--dataset`` or ``--text-file``, one of the two (and how to read invalid UTF-8 in the file)."""
    src = q.add_mutually_exclusive_group(required=True)
    flags.dataset(src, dataset, required=False)
    flags.text_file(src, text_file, old=("--input",))
    flags.errors(q)


def _pattern(q) -> None:
    action = q.add_argument(
        "--pattern", default="gpt2", help="BPE pre-tokenization: %(registry)s, or a regex"
    )
    action.registry = flags.Registry(_patterns)


def _texts(args, split: str, purpose: str = "train a tokenizer on") -> list[str]:
    """Documents of a prepared dataset's split, or of a plain text file; refused when empty."""
    from scratchlm.data import Dataset, read_text_file

    if args.text_file:
        texts, where = [read_text_file(args.text_file, args.errors)], args.text_file
    else:
        texts, where = Dataset.load(args.dataset).documents(split), f"the {split} split of {args.dataset}"
    if not any(texts):
        raise ValueError(f"{where} is empty: there is no text to {purpose}")
    return texts


class Train(Command):
    path = ("tokenizer", "train")
    help = "train a char, byte or BPE tokenizer on a dataset's train split"

    def register(self, q):
        _source(q, "its train split is used", "train on it")
        q.add_argument(
            "--kind",
            choices=flags.Registry(_kinds),
            metavar="KIND",
            default="bpe",
            help="%(choices)s (default bpe)",
        )
        q.add_argument(
            "--vocab-size",
            type=flags.positive_int,
            help="BPE: total vocabulary size, special tokens included (char and byte vocabularies are "
            "fixed: the text's characters, the 256 bytes)",
        )
        _pattern(q)
        specials = q.add_mutually_exclusive_group()
        specials.add_argument(
            "--special",
            action="append",
            help="a special token (repeatable); replaces the default "
            "'<|endoftext|>', which separates documents in token shards",
        )
        specials.add_argument(
            "--no-special", action="store_true", help="no special tokens at all (single-document data only)"
        )
        q.add_argument(
            "--unknown",
            choices=["error", "replace"],
            default="error",
            help="char: unseen characters fail, or map to <|unk|>",
        )
        flags.out(q, "the tokenizer JSON")
        flags.output(q)

    def run(self, args):
        from scratchlm.tokenizers import train_tokenizer

        if args.vocab_size is not None and args.kind != "bpe":
            raise ValueError(
                f"--vocab-size is for BPE: a {args.kind} vocabulary is "
                + ("the set of characters of the text" if args.kind == "char" else "the 256 byte values")
                + " plus the special tokens; leave --vocab-size out, or use --kind bpe"
            )
        check_writable(args.out, "--out")
        texts = _texts(args, "train")
        start = time.perf_counter()
        tokenizer = train_tokenizer(
            args.kind,
            texts,
            vocab_size=args.vocab_size,
            pattern=args.pattern,
            special_tokens=[] if args.no_special else args.special,
            unknown=args.unknown,
            progress=flags.show_progress(args),
        )
        seconds = time.perf_counter() - start
        if args.vocab_size is not None and tokenizer.vocab_size < args.vocab_size:
            print(
                f"scratchlm: warning: the vocabulary stopped at {tokenizer.vocab_size} of the "
                f"{args.vocab_size:,} asked: the text has no more pairs to merge (every pre-tokenized "
                "chunk is one token already)",
                file=sys.stderr,
            )
        tokenizer.save(args.out)
        payload = {
            "path": args.out,
            "kind": args.kind,
            "vocab_size": tokenizer.vocab_size,
            "special_tokens": tokenizer.special_tokens,
            "fingerprint": tokenizer.fingerprint,
            "train_seconds": seconds,
            "train_characters": sum(len(t) for t in texts),
        }
        emit(
            args,
            payload,
            f"{args.kind} tokenizer, vocabulary {tokenizer.vocab_size}, trained in {seconds:.2f}s "
            f"-> {args.out}",
        )


class Encode(Command):
    path = ("tokenizer", "encode")
    help = "text -> ids"

    def register(self, q):
        flags.tokenizer(q, required=True)
        q.add_argument("--text", help="the text to encode (default: --text-file, else stdin)")
        flags.text_file(q, "encode it", old=("--file",))
        flags.errors(q)
        q.add_argument(
            "--allow-special", action="store_true", help="encode special-token spellings as special ids"
        )
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.data import read_text_file

        tokenizer = load_tokenizer(args.tokenizer)
        if args.text is not None:
            text = args.text
        else:
            text = read_text_file(args.text_file, args.errors) if args.text_file else sys.stdin.read()
        ids = tokenizer.encode(text, allowed_special="all" if args.allow_special else frozenset())
        if args.json:
            emit(args, {"ids": ids, "tokens": len(ids), "bytes": len(text.encode("utf-8"))}, "")
        else:
            print(" ".join(map(str, ids)))


class Decode(Command):
    path = ("tokenizer", "decode")
    help = "ids -> text"

    def register(self, q):
        flags.tokenizer(q, required=True)
        q.add_argument("ids", nargs="*", help="ids (default: read from stdin)")
        flags.output(q, progress=False)

    def run(self, args):
        tokenizer = load_tokenizer(args.tokenizer)
        raw = args.ids if args.ids else sys.stdin.read().split()
        try:
            ids = [int(i) for i in raw]
        except ValueError:
            raise ValueError("ids must be integers separated by spaces") from None
        text = tokenizer.decode(ids)
        if args.json:
            emit(args, {"text": text}, "")
        else:
            sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


class Compare(Command):
    path = ("tokenizer", "compare")
    help = "char vs byte vs BPE: bytes/token, tokens, embedding cost, plot"

    def register(self, q):
        _source(q, "train on train, measure on val", "train and measure on it")
        q.add_argument(
            "--vocab-sizes", default="512,1024,2048,4096", help="BPE vocabulary sizes, comma-separated"
        )
        _pattern(q)
        q.add_argument(
            "--d-model",
            type=flags.positive_int,
            default=384,
            help="model width for the embedding-cost column",
        )
        flags.plot(q, default="tokenizer_compare.png")
        flags.output(q)

    def run(self, args):
        from scratchlm.tokenizers.compare import compare_tokenizers, format_table, plot_comparison

        try:
            sizes = [flags.positive_int(v) for v in args.vocab_sizes.split(",")]
        except argparse.ArgumentTypeError:
            raise ValueError(
                f"--vocab-sizes {args.vocab_sizes!r}: expected integers >= 1 separated by commas"
            ) from None
        check_writable(args.plot, "--plot")
        rows = compare_tokenizers(
            _texts(args, "train"),
            _texts(args, "val", "measure the tokenizers on"),
            bpe_vocab_sizes=sizes,
            pattern=args.pattern,
            d_model=args.d_model,
            progress=flags.show_progress(args),
        )
        plot = plot_comparison(
            rows, args.plot, title=f"Tokenizers on {args.dataset or args.text_file} (held-out split)"
        )
        emit(args, {"rows": rows, "plot": str(plot)}, format_table(rows) + f"\nplot: {plot}")
