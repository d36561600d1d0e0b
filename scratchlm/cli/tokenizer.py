"""``scratchlm tokenizer``: train a tokenizer, encode and decode with one, compare kinds and sizes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit, load_tokenizer


def _kinds():
    from scratchlm.tokenizers import KINDS

    return KINDS


def _patterns():
    from scratchlm.tokenizers.patterns import PATTERNS

    return PATTERNS


def _source(q, dataset: str, text_file: str) -> None:
    """``--dataset`` or ``--text-file``, one of the two."""
    src = q.add_mutually_exclusive_group(required=True)
    flags.dataset(src, dataset, required=False)
    flags.text_file(src, text_file, old=("--input",))


def _pattern(q) -> None:
    action = q.add_argument(
        "--pattern", default="gpt2", help="BPE pre-tokenization: %(registry)s, or a regex"
    )
    action.registry = flags.Registry(_patterns)


def _texts(args, split: str) -> list[str]:
    """Documents of a prepared dataset's split, or of a plain text file."""
    from scratchlm.data import Dataset

    if args.text_file:
        return [Path(args.text_file).read_text(encoding="utf-8")]
    return Dataset.load(args.dataset).documents(split)


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
        q.add_argument("--vocab-size", type=int, help="BPE: total vocabulary size, special tokens included")
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
        q.add_argument(
            "--allow-special", action="store_true", help="encode special-token spellings as special ids"
        )
        flags.output(q, progress=False)

    def run(self, args):
        tokenizer = load_tokenizer(args.tokenizer)
        if args.text is not None:
            text = args.text
        else:
            text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else sys.stdin.read()
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
        q.add_argument("--d-model", type=int, default=384, help="model width for the embedding-cost column")
        flags.plot(q, default="tokenizer_compare.png")
        flags.output(q)

    def run(self, args):
        from scratchlm.tokenizers.compare import compare_tokenizers, format_table, plot_comparison

        sizes = [int(v) for v in args.vocab_sizes.split(",")]
        rows = compare_tokenizers(
            _texts(args, "train"),
            _texts(args, "val"),
            bpe_vocab_sizes=sizes,
            pattern=args.pattern,
            d_model=args.d_model,
            progress=flags.show_progress(args),
        )
        plot = plot_comparison(
            rows, args.plot, title=f"Tokenizers on {args.dataset or args.text_file} (held-out split)"
        )
        emit(args, {"rows": rows, "plot": str(plot)}, format_table(rows) + f"\nplot: {plot}")
