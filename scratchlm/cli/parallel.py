"""``scratchlm parallel``: pipeline-parallel schedules, simulated (1F1B, zero-bubble, DualPipe)."""

from __future__ import annotations

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit


def _schedules():
    from scratchlm.train.pipeline_schedule import SCHEDULES

    return SCHEDULES


class Simulate(Command):
    path = ("parallel", "simulate")
    help = "time a pipeline schedule (1F1B, zero-bubble, DualPipe): bubbles, memory"

    def register(self, q):
        q.add_argument(
            "--schedule",
            required=True,
            choices=flags.Registry(_schedules),
            metavar="SCHEDULE",
            help="%(choices)s",
        )
        q.add_argument(
            "--stages",
            type=flags.positive_int,
            required=True,
            help="pipeline stages P, one per rank (dualpipe: even)",
        )
        q.add_argument(
            "--chunks",
            type=flags.positive_int,
            required=True,
            help="micro-batches (dualpipe: even, at least 2 x stages)",
        )
        q.add_argument("--forward", type=float, default=1.0, help="time F of one stage's forward (default 1)")
        q.add_argument(
            "--backward-input", type=float, default=1.0, help="time B of the backward for inputs (default 1)"
        )
        q.add_argument(
            "--backward-weight",
            type=float,
            default=1.0,
            help="time W of the backward for weights (default 1)",
        )
        q.add_argument(
            "--overlap",
            type=float,
            help="dualpipe: time of an overlapped forward + full backward (default F+B+W, no gain)",
        )
        flags.plot(q)
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.train.pipeline_schedule import plot_timeline, simulate

        timeline = simulate(
            args.schedule,
            args.stages,
            args.chunks,
            args.forward,
            args.backward_input,
            args.backward_weight,
            args.overlap,
        )
        if args.plot:
            plot_timeline(timeline, args.plot)
        payload = timeline.to_dict(events=False) | {"plot": args.plot}
        lines = [
            f"{args.schedule}: {args.stages} stages, {args.chunks} micro-batches, "
            f"total time {timeline.total_time:g}",
            f"{'rank':>4} {'busy':>8} {'bubble':>8} {'params':>6} {'activations':>11}",
        ]
        lines += [
            f"{r:>4} {timeline.busy[r]:>8g} {timeline.bubble[r]:>8g} {timeline.parameter_memory[r]:>5}x "
            f"{timeline.activation_memory[r]:>11}"
            for r in range(args.stages)
        ]
        caveat = (
            ""
            if payload["table2_conditions_hold"]
            else " (its conditions do not hold here: see docs/pipeline-parallelism.md)"
        )
        lines.append(
            f"bubble per rank (max): {payload['max_bubble']:g}; DeepSeek-V3 Table 2 formula: "
            f"{payload['table2_bubble']:g}{caveat}" + (f"\ntimeline: {args.plot}" if args.plot else "")
        )
        emit(args, payload, "\n".join(lines))
