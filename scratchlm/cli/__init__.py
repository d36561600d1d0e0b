"""The ``scratchlm`` command line: a thin layer that parses arguments, calls the API, prints.

Every command is listed once, below, in its group; each group's module registers its commands'
flags beside their handlers (``Command.register`` / ``Command.run``), with the shared flag
vocabulary of :mod:`scratchlm.cli.flags`. Every command that reports numbers takes ``--json`` and
then prints exactly one JSON object on stdout (progress bars go to stderr).
"""

from __future__ import annotations

import argparse
import sys

from scratchlm import __version__
from scratchlm.cli import critique, data, infer, model, parallel, posttrain, tokenizer, train
from scratchlm.cli import eval as evaluate
from scratchlm.cli.base import Command
from scratchlm.cli.flags import HelpFormatter

# group -> (what it is for, its commands), in the order of the pipeline.
GROUPS: dict[str, tuple[str, list[Command]]] = {
    "data": ("prepare corpora and token shards", [data.Prepare(), data.Tokenize(), data.Sources()]),
    "tokenizer": (
        "train, use and compare tokenizers",
        [tokenizer.Train(), tokenizer.Encode(), tokenizer.Decode(), tokenizer.Compare()],
    ),
    "model": (
        "describe models, move them to and from Hugging Face; bigram baselines",
        [model.Info(), model.Shapes(), model.Import(), model.Export(), model.Bigram()],
    ),
    "train": ("pretrain a GPT", [train.Train()]),
    "infer": ("generate text from a checkpoint", [infer.Sample(), infer.Generate()]),
    "eval": ("measure a checkpoint", [evaluate.Eval()]),
    "posttrain": (
        "chat models: fine-tuning, preferences, RL, the critique loop",
        [
            posttrain.SFT(),
            posttrain.DPO(),
            posttrain.RewardModel(),
            posttrain.PPO(),
            posttrain.GRPO(),
            critique.CritiqueRevise(),
            critique.Tasks(),
            posttrain.LoraMerge(),
        ],
    ),
    "parallel": ("parallel training, simulated", [parallel.Simulate()]),
}
# Commands typed as two words ("data prepare"): what the first word's help says.
NAMESPACES = {
    "data": "prepare corpora and token shards",
    "tokenizer": "train, use and compare tokenizers",
    "model": "describe models; import and export Hugging Face folders",
    "lora": "LoRA adapters",
    "parallel": "parallel training, simulated",
}


def commands() -> list[Command]:
    return [command for _, group in GROUPS.values() for command in group]


def _groups_text() -> str:
    lines = ["command groups:"]
    for name, (what, group) in GROUPS.items():
        lines.append(f"  {name:<10} {what}")
        lines.append(f"  {'':<10}   {', '.join(' '.join(c.path) for c in group)}")
    return (
        "\n".join(lines)
        + "\n\nEvery command's --help lists its flags; shared flags mean the same everywhere."
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scratchlm",
        description="Build a GPT from scratch: data, tokenizers, models.",
        epilog=_groups_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nested: dict[str, argparse._SubParsersAction] = {}
    for command in commands():
        parent, name = sub, command.path[-1]
        if len(command.path) == 2:
            first = command.path[0]
            if first not in nested:
                nested[first] = sub.add_parser(first, help=NAMESPACES[first]).add_subparsers(
                    dest=f"{first}_command", required=True, metavar="ACTION"
                )
            parent = nested[first]
        q = parent.add_parser(
            name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        command.register(q)
        q.set_defaults(func=command.run)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2: it printed usage and why)
        return e.code if isinstance(e.code, int) else 2
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        # The project's own errors say what was expected and what to do: print them, no traceback.
        # Anything else (a KeyError, a TypeError...) is a bug and keeps its traceback.
        message = str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        print(f"scratchlm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C where nothing takes it over: one line, exit 130 (128 + SIGINT), no traceback. A
        # trainer that had taken a first Ctrl-C (and was about to save) says so in the exception.
        print(f"scratchlm: {str(e) or 'interrupted by Ctrl-C'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
