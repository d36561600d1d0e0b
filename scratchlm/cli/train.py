"""``scratchlm train``: pretrain a GPT from a TOML config (checkpoint D), or continue a run.

``--resume --out DIR`` continues the run in DIR with the settings its checkpoint recorded; a
``--config`` or ``--set`` given as well replaces those values, each change reported on one line.
"""

from __future__ import annotations

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit


class Train(Command):
    path = ("train",)
    help = "train a GPT from a TOML config (checkpoint D), or continue a run with --resume"
    runs_model = True

    def register(self, q):
        flags.config(q, "the run's settings (with --resume: default, the ones the run recorded)")
        flags.overrides(q)
        flags.device(q)
        flags.resume_or_overwrite(q)
        q.add_argument(
            "--resume-from",
            choices=("last", "best"),
            help="with --resume: the checkpoint to continue from (default last; a run keeps only last "
            "and best, every other step's checkpoint is deleted once neither names it)",
        )
        flags.out(
            q, "the run folder: checkpoints, metrics.jsonl, loss.png (sets train.out_dir)", required=False
        )
        flags.output(q)

    def run(self, args):
        from scratchlm.config import load_config
        from scratchlm.models.blocks.attention import LEGACY_PATHS
        from scratchlm.train import train

        if args.resume_from and not args.resume:
            raise ValueError("--resume-from needs --resume (it chooses the checkpoint a run continues from)")
        flags.refuse_set_beside_its_flag(
            args.set, {"train.out_dir": ("--out", args.out), "train.device": ("--device", args.device)}
        )
        overrides = [*args.set, *([f"train.device={args.device}"] if args.device else [])]
        config = load_config(args.config, overrides, aliases=LEGACY_PATHS)
        if args.out:  # a folder name as typed (a --set value would be read as TOML: 2024-06-01 a date)
            config.setdefault("train", {})["out_dir"] = args.out
        summary = train(
            config,
            resume=args.resume,
            progress=flags.show_progress(args),
            overwrite=args.overwrite,
            resume_from=args.resume_from or "last",
            from_run=args.resume and not args.config,  # the run's recorded config, with --set over it
        )
        emit(
            args,
            summary,
            f"done: {summary['steps']} steps ({summary['stop_reason']}), best val loss "
            f"{summary['best_val_loss']:.4f}, {summary['seconds']:.0f}s\n"
            f"checkpoints: {summary['out_dir']}/best, {summary['out_dir']}/last\n"
            f"loss plot: {summary['loss_plot']}",
        )
