"""``scratchlm eval``: a checkpoint's cross-entropy, perplexity, bits per byte, loss by position, probes."""

from __future__ import annotations

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit


class Eval(Command):
    path = ("eval",)
    help = "cross-entropy, perplexity, bits per byte, loss by position, probes"
    runs_model = True

    def register(self, q):
        flags.checkpoint(q)
        flags.shards(q, "default: the one the checkpoint was trained on", old=("--data",))
        q.add_argument(
            "--splits",
            default="val,test",
            help="comma-separated splits; 'val+test' evaluates them as one text",
        )
        flags.batch_size(q, 32)
        flags.device(q)
        flags.output(q)

    def run(self, args):
        from scratchlm.eval import evaluate_checkpoint, format_report

        report = evaluate_checkpoint(
            args.checkpoint,
            args.shards,
            splits=args.splits.split(","),
            device=args.device,
            batch_size=args.batch_size,
            progress=flags.show_progress(args),
        )
        emit(args, report, format_report(report))
