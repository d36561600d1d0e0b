"""``scratchlm critique-revise`` (the constitutional AI loop) and ``scratchlm tasks`` (synthetic
tasks with exact answers: the SFT, preference and RL data the loop and the trainers measure on)."""

from __future__ import annotations

from pathlib import Path

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit
from scratchlm.cli.posttrain import sections


def _task_names():
    from scratchlm.posttrain.tasks import TASKS

    return TASKS


class Tasks(Command):
    path = ("tasks",)
    help = "synthetic tasks with exact answers: SFT, preference and RL data, held-out splits"

    def register(self, q):
        tasks = q.add_argument("--tasks", default="addition", help="comma-separated, of: %(registry)s")
        tasks.registry = flags.Registry(_task_names)
        q.add_argument("--train", type=flags.positive_int, default=2000, help="training problems per task")
        q.add_argument("--test", type=flags.non_negative_int, default=200, help="held-out problems per task")
        q.add_argument(
            "--difficulty",
            type=flags.positive_int,
            default=2,
            help="digits / string length / keys grow with it",
        )
        flags.seed(q)
        flags.out(q, "the data folder")
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.posttrain.data import write_task_data

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        manifest = write_task_data(
            args.out, tasks, train=args.train, test=args.test, difficulty=args.difficulty, seed=args.seed
        )
        files = ", ".join(f"{name} ({info['records']})" for name, info in manifest["files"].items())
        emit(args, {"out": args.out, **manifest}, f"wrote {args.out}: {files}")


class CritiqueRevise(Command):
    path = ("critique-revise",)
    help = (
        "constitutional AI loop: critique replies against principles, revise, train on the better revisions "
        "(SFT) or revision-over-original pairs (DPO)"
    )
    runs_model = True

    def register(self, q):
        flags.checkpoint(q, "the starting model (an SFT model); also the model critic")
        flags.prompts(q, '{"prompt": text or messages, "answer"?: text}')
        q.add_argument(
            "--principles", required=True, help='JSON list of {"name", "text", "check": {"kind", ...}}'
        )
        flags.out(q, "the folder: results.json and round-N/ (critiques, data, training run)")
        flags.eval_prompts(q, "default: --held-out of --prompts, set aside by hash")
        q.add_argument(
            "--held-out",
            type=float,
            default=0.2,
            help="fraction of --prompts kept for measuring (default 0.2)",
        )
        q.add_argument(
            "--rounds",
            type=flags.positive_int,
            default=1,
            help="rounds, each training from the previous round's model",
        )
        flags.add(
            q,
            "--candidates",
            "--num-samples",
            type=flags.positive_int,
            default=4,
            help="revision candidates per reply that breaks a principle (default 4)",
        )
        q.add_argument(
            "--method",
            choices=("sft", "dpo"),
            default="sft",
            help="learn the revisions (sft) or revision over original (dpo)",
        )
        flags.temperature(
            q, 1.0, "of the original replies, the revision candidates and the sampled compliance"
        )
        q.add_argument(
            "--epochs",
            type=float,
            default=3.0,
            help="passes over each round's data (sets "
            "train.max_steps unless --set train.max_steps is given; default 3)",
        )
        flags.max_new_tokens(q, 32)
        flags.seed(q)
        q.add_argument(
            "--scorer",
            action="append",
            default=[],
            help="NAME=MODULE:FUNCTION, a (prompt messages, "
            "reply) -> float function for principles of kind scorer (repeatable)",
        )
        flags.reward_model(q, "the scorer named reward_model")
        flags.lora_rank(q)
        flags.tokenizer(q)
        flags.device(q)
        flags.skip_invalid(q)
        flags.overrides(
            q,
            "sft.key=value / dpo.key=value or train.key=value for every round's training, "
            "e.g. train.max_steps=200",
        )
        flags.resume_or_overwrite(q)
        flags.output(q)

    def run(self, args):
        from scratchlm.posttrain.critique.critics import RewardScorer, load_scorer
        from scratchlm.posttrain.critique.loop import critique_revise

        method, train = sections(
            args,
            args.method,
            {
                "train.device": ("--device", args.device),
                f"{args.method}.lora_rank": ("--lora-rank", args.lora_rank),
            },
            hint=f" (with --method {args.method})",
        )
        scorers = {}
        for item in args.scorer:
            name, sep, spec = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--scorer takes NAME=MODULE:FUNCTION, got {item!r}")
            scorers[name] = load_scorer(spec)
        if args.reward_model:  # on --device, scoring each batch of replies at once
            scorers["reward_model"] = RewardScorer(args.reward_model, args.device)
        results = critique_revise(
            args.checkpoint,
            args.prompts,
            args.principles,
            args.out,
            eval_prompts=args.eval_prompts,
            scorers=scorers,
            tokenizer=args.tokenizer,
            device=args.device,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=flags.show_progress(args),
            skip_invalid=args.skip_invalid,
            rounds=args.rounds,
            samples=args.candidates,
            method=args.method,
            temperature=args.temperature,
            max_tokens=args.max_new_tokens,
            held_out=args.held_out,
            seed=args.seed,
            epochs=args.epochs,
            method_config=method,
            train_config=train,
        )

        def curve(key, name=None, digits=1):
            return " -> ".join(
                f"{(c[key][name] if name else c[key]):.{digits}%}" for c in results["compliance"]
            )

        per = "; ".join(
            f"{name} {curve('per_principle', name, 0)}" for name in results["compliance"][0]["per_principle"]
        )
        emit(
            args,
            results,
            f"held-out compliance, every principle ({results['compliance'][0]['n']} prompts): greedy "
            f"{curve('all')}; sampled {curve('sampled_all')}\nper principle (greedy): {per}; ended with "
            f"<|im_end|> {curve('ended_with_end_of_turn', digits=0)}\nstopped: {results['stop_reason']}; "
            f"final checkpoint: {results['final_checkpoint']}\nresults: {Path(args.out) / 'results.json'}",
        )
