"""``scratchlm train``: pretrain a GPT from a TOML config (checkpoint D)."""

from __future__ import annotations

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit


class Train(Command):
    path = ("train",)
    help = "train a GPT from a TOML config (checkpoint D)"
    runs_model = True

    def register(self, q):
        flags.config(q)
        flags.overrides(q)
        flags.device(q)
        flags.resume_or_overwrite(q)
        flags.output(q)

    def run(self, args):
        from scratchlm.config import load_config
        from scratchlm.models.blocks.attention import LEGACY_PATHS
        from scratchlm.train import train

        overrides = [*args.set, *([f"train.device={args.device}"] if args.device else [])]
        summary = train(
            load_config(args.config, overrides, aliases=LEGACY_PATHS),
            resume=args.resume,
            progress=flags.show_progress(args),
            overwrite=args.overwrite,
        )
        emit(
            args,
            summary,
            f"done: {summary['steps']} steps ({summary['stop_reason']}), best val loss "
            f"{summary['best_val_loss']:.4f}, {summary['seconds']:.0f}s\n"
            f"checkpoints: {summary['out_dir']}/best, {summary['out_dir']}/last\n"
            f"loss plot: {summary['loss_plot']}",
        )
