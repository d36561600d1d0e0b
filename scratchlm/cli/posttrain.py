"""Post-training commands: ``sft``, ``dpo``, ``reward-model``, ``ppo``, ``grpo``, ``critique-revise``,
``tasks`` (synthetic data with exact answers) and ``lora merge``."""

from __future__ import annotations

from pathlib import Path

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit

_POLICY = "the starting policy, also the frozen reference (an SFT model)"
_PAIRS = '{"prompt", "chosen", "rejected"} pairs'


def sections(
    args, method: str, flags_set: dict[str, tuple[str, object]], hint: str = ""
) -> tuple[dict, dict]:
    """The method's section ([sft], [dpo], ...) and [train], from ``--set`` overrides and the flags.

    ``flags_set`` maps each ``section.key`` that a flag of the command sets to (the flag, its value;
    None when not given): a given flag's value is used, and ``--set`` of the same key beside it is
    refused (:func:`~scratchlm.cli.flags.refuse_set_beside_its_flag`, the rule of every command)."""
    from scratchlm.config import apply_overrides

    flags.refuse_set_beside_its_flag(args.set, flags_set)
    sections = apply_overrides({method: {}, "train": {}}, args.set)
    if set(sections) - {method, "train"}:
        raise ValueError(
            f"--set takes {method}.key=value or train.key=value{hint}, got sections "
            f"{sorted(set(sections) - {method, 'train'})}"
        )
    for dotted, (_, value) in flags_set.items():
        section, key = dotted.split(".")
        if value is not None:
            sections[section][key] = value
    return sections[method], sections["train"]


class _Method(Command):
    """A post-training method: a starting checkpoint, JSONL records, a run folder."""

    method = ""
    checkpoint_role = _POLICY
    data_form = ""
    runs_model = True

    def register(self, q):
        flags.checkpoint(q, self.checkpoint_role)
        flags.data(q, self.data_form)
        flags.val_data(q)
        flags.out(q, "the run folder (checkpoints, metrics.jsonl, loss.png)")
        flags.lora_rank(q)
        flags.tokenizer(q)
        flags.skip_invalid(q)
        flags.overrides(q, f"{self.method}.key=value or train.key=value")
        flags.device(q)
        flags.resume_or_overwrite(q)
        flags.output(q)

    def flags_set(self, args) -> dict[str, tuple[str, object]]:
        """``section.key`` -> (the flag that sets it, its value or None): each a key ``--set`` refuses."""
        m = self.method
        return {
            "train.out_dir": ("--out", args.out),
            "train.device": ("--device", args.device),
            f"{m}.base": ("--checkpoint", args.checkpoint),
            f"{m}.data": ("--data", args.data),
            f"{m}.val_data": ("--val-data", args.val_data),
            f"{m}.tokenizer": ("--tokenizer", args.tokenizer),
            f"{m}.skip_invalid": ("--skip-invalid", args.skip_invalid or None),
            f"{m}.lora_rank": ("--lora-rank", args.lora_rank),
            **self.method_flags(args),
        }

    def method_flags(self, args) -> dict[str, tuple[str, object]]:
        """The method's own flags, as in :meth:`flags_set`."""
        return {}

    def train(self, args, fit) -> dict:
        method, train = sections(args, self.method, self.flags_set(args))
        return fit(
            method, train, resume=args.resume, progress=flags.show_progress(args), overwrite=args.overwrite
        )


class SFT(_Method):
    path, method = ("sft",), "sft"
    help = "supervised fine-tuning on conversations (full or LoRA), masked to the replies"
    checkpoint_role, data_form = "the base (pretrained) model", "chat messages, Alpaca or prompt/completion"

    def register(self, q):
        super().register(q)
        flags.eval_prompts(q, "exact match before and after")

    def run(self, args):
        from scratchlm.posttrain.evaluate import exact_match_before_after
        from scratchlm.posttrain.sft import sft

        summary = self.train(args, sft)
        text = (
            f"done: {summary['steps']} steps ({summary['stop_reason']}), best held-out loss "
            f"{summary['best_val_loss']:.4f}, {summary['seconds']:.0f}s\n"
            f"checkpoints: {args.out}/best, {args.out}/last"
        )
        if args.eval_prompts:
            em = summary["exact_match"] = exact_match_before_after(
                args.checkpoint, Path(args.out) / "best", args.eval_prompts, args.tokenizer, args.device
            )
            text += (
                f"\nexact match on {em['after']['n']} held-out prompts: "
                f"{em['before']['exact_match']:.1%} before, "
                f"{em['after']['exact_match']:.1%} after; replies ending with <|im_end|>: "
                f"{em['after']['ended_with_end_of_turn']:.1%}"
            )
        emit(args, summary, text)


class DPO(_Method):
    path, method = ("dpo",), "dpo"
    help = "Direct Preference Optimization on (prompt, chosen, rejected) pairs"
    data_form = _PAIRS

    def register(self, q):
        super().register(q)
        q.add_argument("--beta", type=float, help="strength of the pull towards the reference (default 0.1)")

    def method_flags(self, args):
        return {"dpo.beta": ("--beta", args.beta)}

    def run(self, args):
        from scratchlm.posttrain.dpo import dpo
        from scratchlm.train.metrics import read_evaluations

        summary = self.train(args, dpo)
        evals = summary["eval"] = read_evaluations(args.out, "val_rewards/accuracies")
        text = (
            f"done: {summary['steps']} steps ({summary['stop_reason']}), best held-out DPO loss "
            f"{summary['best_val_loss']:.4f}"
        )
        if evals:
            text += (
                "\nheld-out preference accuracy: "
                f"reference {evals[0]['val_reference_preference_accuracy']:.1%}, "
                f"after {evals[-1]['val_preference_accuracy']:.1%} (step {evals[-1]['step']}); "
                f"rewards/accuracies {evals[-1]['val_rewards/accuracies']:.1%}, "
                f"margin {evals[-1]['val_rewards/margins']:.3f}"
            )
        emit(args, summary, text + f"\ncheckpoints: {args.out}/best, {args.out}/last")


class RewardModel(_Method):
    path, method = ("reward-model",), "reward_model"
    help = "a reward model (scalar head, Bradley-Terry loss) on preference pairs"
    checkpoint_role, data_form = "the starting model (usually the SFT model)", _PAIRS

    def run(self, args):
        from scratchlm.posttrain.reward import train_reward_model
        from scratchlm.train.metrics import read_evaluations

        summary = self.train(args, train_reward_model)
        evals = summary["eval"] = read_evaluations(args.out, "val_accuracy")
        text = (
            f"done: {summary['steps']} steps ({summary['stop_reason']}), best held-out loss "
            f"{summary['best_val_loss']:.4f}"
        )
        if evals:
            text += (
                f"\nheld-out pair accuracy {evals[0]['val_accuracy']:.1%} (step {evals[0]['step']}) -> "
                f"{evals[-1]['val_accuracy']:.1%} (step {evals[-1]['step']}), "
                f"margin {evals[-1]['val_margin']:.3f}"
            )
        emit(
            args,
            summary,
            text + f"\ncheckpoints: {args.out}/best, {args.out}/last (model + reward_head.safetensors)",
        )


class _RL(_Method):
    def run(self, args):
        from scratchlm.posttrain.rl.grpo import grpo
        from scratchlm.posttrain.rl.ppo import ppo
        from scratchlm.train.metrics import read_evaluations

        summary = self.train(args, ppo if self.method == "ppo" else grpo)
        evals = summary["eval"] = read_evaluations(args.out, "val_reward")
        text = f"done: {summary['steps']} steps ({summary['stop_reason']}), {summary['seconds']:.0f}s"
        if evals:
            first, last = evals[0], evals[-1]
            text += (
                f"\nheld-out reward (greedy) {first['val_reward']:.3f} (step {first['step']}) -> "
                f"{last['val_reward']:.3f} (step {last['step']})"
            )
            if "val_exact_match" in last:
                text += f", exact match {first['val_exact_match']:.1%} -> {last['val_exact_match']:.1%}"
        emit(
            args, summary, text + f"\ncheckpoints: {args.out}/best (highest held-out reward), {args.out}/last"
        )


class PPO(_RL):
    path, method = ("ppo",), "ppo"
    help = "PPO: sampled replies scored by a reward model (or the answers), KL to the start"
    data_form = '{"prompt", "answer"} prompts (the answer may be left out with --reward-model)'

    def register(self, q):
        super().register(q)
        flags.reward_model(q, "the reward (default: reward = exact answer)")

    def method_flags(self, args):
        return {"ppo.reward_model": ("--reward-model", args.reward_model)}


class GRPO(_RL):
    path, method = ("grpo",), "grpo"
    help = "GRPO: groups of sampled replies, verifiable rewards, group-normalised advantages"
    data_form = '{"prompt", "answer"} prompts with the exact answer'


class LoraMerge(Command):
    path = ("lora", "merge")
    help = "fold adapters into the base weights: an ordinary checkpoint"

    def register(self, q):
        flags.checkpoint(q, "the base the adapters were trained on")
        q.add_argument(
            "--adapters",
            required=True,
            help="adapters .safetensors (saved by save_adapters, or a LoRA "
            "SFT run's checkpoint/adapters.safetensors)",
        )
        flags.tokenizer(q)
        flags.out(q, "the merged checkpoint folder")
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.posttrain.lora import merge_adapters

        meta = merge_adapters(args.checkpoint, args.adapters, args.out, args.tokenizer)
        emit(
            args,
            {"out": args.out, "rank": int(meta["rank"]), "alpha": float(meta["alpha"])},
            f"merged {args.adapters} (rank {meta['rank']}) into {args.checkpoint} -> {args.out}",
        )
