"""The measured post-training path, on a CPU, from nothing:

1. synthetic task data (``scratchlm tasks``): 2-digit additions, held-out test problems;
2. a base model pretrained on the training problems as plain text ("12+30=42"): it knows
   addition but has never seen the chat format;
3. SFT (full, and LoRA) on the same problems as conversations;
4. exact match on the held-out problems, asked in the chat format, before and after, and the
   fraction of replies that end with <|im_end|>.

    python benchmarks/posttrain.py [--quick] [--out DIR --reuse] [--plot docs/images/posttrain_rl.png]
                                                   # -> benchmarks/results/posttrain.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import save


def main() -> None:
    import torch

    from scratchlm.data import prepare_dataset
    from scratchlm.data.shards import tokenize_dataset
    from scratchlm.posttrain.data import load_prompts, write_task_data
    from scratchlm.posttrain.evaluate import exact_match
    from scratchlm.posttrain.sft import sft
    from scratchlm.serve.chat import load_chat_model
    from scratchlm.tokenizers import train_tokenizer
    from scratchlm.train import train

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer steps: a smoke run")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--plot", help="write the RL training curves here (e.g. docs/images/posttrain_rl.png)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="with --out: keep the finished training runs found there "
        "(their times are read from their metrics.jsonl) and redo only what is missing",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(args.out or tempfile.mkdtemp())
    pretrain_steps, sft_steps, dpo_steps, rl_steps = (
        (300, 100, 40, 20) if args.quick else (3000, 1000, 200, 300)
    )
    results: dict = {
        "task": "addition, 2 digits",
        "steps": {
            "pretrain": pretrain_steps,
            "sft": sft_steps,
            "dpo": dpo_steps,
            "reward_model_grpo_ppo": rl_steps,
        },
    }

    start = time.perf_counter()
    write_task_data(work / "tasks", ["addition"], train=5000, test=200, difficulty=2)
    ds, _ = prepare_dataset(str(work / "tasks" / "corpus-train.txt"), work / "corpus", documents="lines")
    texts = list(ds.documents("train"))
    tok = train_tokenizer("char", texts + ["abcdefghijklmnopqrstuvwxyz\n "], special_tokens=["<|endoftext|>"])
    tok.save(work / "char.json")
    shards = tokenize_dataset(ds, work / "char.json")["path"]
    results["seconds_data"] = time.perf_counter() - start

    def finished(run: Path):
        """A finished run in --out, reused: (its summary, its training seconds), else None."""
        if not (args.reuse and (run / "best").exists()):
            return None
        import json

        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return (
            {"best_val_loss": min(r["val_loss"] for r in records if "val_loss" in r)},
            records[-1]["seconds"],
        )

    start = time.perf_counter()
    reused = finished(work / "base")
    base = (
        reused[0]
        if reused
        else train(
            {
                "model": {
                    "n_layer": 4,
                    "n_head": 4,
                    "d_model": 128,
                    "block_size": 64,
                    "position": "rope",
                    "norm": "rmsnorm",
                    "mlp": "swiglu",
                    "bias": False,
                    "dropout": 0.0,
                },
                "train": {
                    "data": shards,
                    "out_dir": str(work / "base"),
                    "batch_size": 32,
                    "max_steps": pretrain_steps,
                    "eval_interval": pretrain_steps // 4,
                    "warmup_steps": 100,
                    "lr": 3e-3,
                    "min_lr": 3e-4,
                    "sample_tokens": 0,
                    "log_interval": 100,
                },
            },
            progress=False,
        )
    )
    results["seconds_pretrain"] = reused[1] if reused else time.perf_counter() - start
    results["base_val_loss"] = base["best_val_loss"]

    prompts = load_prompts(work / "tasks" / "prompts-test.jsonl").items
    model, chat_tok = load_chat_model(
        work / "base" / "best", device="cpu"
    )  # the chat tokens' rows grown, as SFT starts
    results["before"] = exact_match(model, chat_tok, prompts, max_tokens=8)
    print(f"base: exact match {results['before']['exact_match']:.1%} in the chat format")

    # LoRA (rank 16) trains twice as long: it moves little per step, and it keeps the base's arithmetic.
    for name, extra in (
        ("full", {}),
        ("lora", {"lora_rank": 16}),
        ("no_end_of_turn", {"learn_end_of_turn": False}),
    ):
        start = time.perf_counter()
        reused = finished(work / f"sft-{name}")
        steps = sft_steps * (2 if name == "lora" else 1)
        summary = (
            reused[0]
            if reused
            else sft(
                {
                    "base": str(work / "base" / "best"),
                    "data": str(work / "tasks" / "sft-train.jsonl"),
                    "val_data": str(work / "tasks" / "sft-test.jsonl"),
                    **extra,
                },
                {
                    "out_dir": str(work / f"sft-{name}"),
                    "max_steps": steps,
                    "eval_interval": steps // 4,
                    "batch_size": 32,
                    "lr": 1e-3 if name != "lora" else 3e-3,
                },
                progress=False,
            )
        )
        seconds = reused[1] if reused else time.perf_counter() - start
        model, tuned_tok = load_chat_model(work / f"sft-{name}" / "best", device="cpu")
        after = exact_match(model, tuned_tok, prompts, max_tokens=8)
        results[f"sft_{name}"] = {
            **after,
            "steps": steps,
            "seconds": seconds,
            "best_val_loss": summary["best_val_loss"],
        }
        print(
            f"SFT {name}: exact match {after['exact_match']:.1%}, replies ending with <|im_end|> "
            f"{after['ended_with_end_of_turn']:.1%}, {seconds:.0f} s"
        )
    # DPO from the full SFT model on correct-vs-wrong pairs; held-out pairs for the preference accuracy.
    import json

    from scratchlm.posttrain.dpo import dpo

    for name, extra in (("dpo", {}), ("dpo_rpo", {"rpo_alpha": 1.0})):
        start = time.perf_counter()
        reused = finished(work / name)
        if not reused:
            dpo(
                {
                    "base": str(work / "sft-full" / "best"),
                    "data": str(work / "tasks" / "pairs-train.jsonl"),
                    "val_data": str(work / "tasks" / "pairs-test.jsonl"),
                    **extra,
                },
                {
                    "out_dir": str(work / name),
                    "max_steps": dpo_steps,
                    "eval_interval": dpo_steps // 2,
                    "lr": 1e-4,
                    "batch_size": 32,
                },
                progress=False,
            )
        seconds = reused[1] if reused else time.perf_counter() - start
        evals = [
            r
            for r in map(json.loads, (work / name / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r
        ]
        after = exact_match(*load_chat_model(work / name / "last", device="cpu"), prompts, max_tokens=8)
        results[name] = {
            **after,
            "seconds": seconds,
            "preference_accuracy_before": evals[0]["val_reference_preference_accuracy"],
            "preference_accuracy_after": evals[-1]["val_preference_accuracy"],
            "rewards/accuracies": evals[-1]["val_rewards/accuracies"],
            "rewards/margins": evals[-1]["val_rewards/margins"],
            "val_loss": evals[-1]["val_loss"],
        }
        d = results[name]
        print(
            f"{name}: held-out preference accuracy {d['preference_accuracy_before']:.1%} -> "
            f"{d['preference_accuracy_after']:.1%}, exact match {after['exact_match']:.1%}, {seconds:.0f} s"
        )
    rl_section(work, results, prompts, finished, rl_steps)
    format_section(work, results, prompts, finished, sft_steps, rl_steps, dpo_steps)
    print(f"wrote {save('posttrain', results)}")
    if args.plot:
        print(f"wrote {plot_rl_curves(work, args.plot)}")


def plot_rl_curves(work: Path, path: str) -> Path:
    """Per-step curves of the RL runs (mean over windows of 10 steps): GRPO's rollout reward and
    KL, PPO's reward-model score and KL, on both starting models."""
    import json

    from scratchlm.plots import pyplot, save_figure

    def series(run: str, key: str):
        rows = [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if key in r and "loss" in r]
        steps, values = [r["step"] for r in rows], [r[key] for r in rows]
        w = 10
        return steps[w - 1 :], [sum(values[i - w + 1 : i + 1]) / w for i in range(w - 1, len(values))]

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run, label in (("grpo", "from full SFT"), ("mixed-grpo", "imperfect demonstrations")):
        axes[0].plot(*series(run, "reward"), label=label)
        axes[2].plot(*series(run, "kl"), label=f"GRPO, {label} (per token, k3)")
    for run, label in (("ppo", "from full SFT (62.5% RM)"), ("mixed-ppo", "imperfect demonstrations")):
        axes[1].plot(*series(run, "objective/scores"), label=label)
        axes[2].plot(*series(run, "objective/kl"), "--", label=f"PPO, {label} (per reply)")
    axes[0].set(title="GRPO: rollout reward (exact answer)", xlabel="step", ylabel="mean reward")
    axes[1].set(title="PPO: reward-model score", xlabel="step", ylabel="score")
    axes[2].set(title="KL to the reference", xlabel="step", ylabel="nats")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def sampled_exact_match(model, tokenizer, prompts, samples: int = 4, max_tokens: int = 8) -> float:
    """Exact match of replies *sampled* at temperature 1 (seeded), the rollouts' own statistic:
    how much of its probability the model puts on the right answer, not only whether it is the mode."""
    from scratchlm.serve.chat import generate_replies

    answers = [p for p in prompts for _ in range(samples)]
    replies = generate_replies(
        model,
        tokenizer,
        [p.prompt for p in answers],
        max_tokens,
        temperature=1.0,
        seeds=list(range(len(answers))),
    )
    return sum(p.reward(r["text"]) for p, r in zip(answers, replies)) / len(replies)


def rl_section(work: Path, results: dict, prompts, finished, rl_steps: int) -> None:
    """Reward model, GRPO and PPO from the full-SFT model."""

    from scratchlm.posttrain.evaluate import exact_match
    from scratchlm.posttrain.reward import train_reward_model
    from scratchlm.posttrain.rl.grpo import grpo
    from scratchlm.posttrain.rl.ppo import ppo
    from scratchlm.serve.chat import load_chat_model
    from scratchlm.train.metrics import read_evaluations

    tasks, sft_best = work / "tasks", str(work / "sft-full" / "best")

    def measured(run: str) -> dict:
        model, tok = load_chat_model(work / run / "last", device="cpu")
        return {
            **exact_match(model, tok, prompts, max_tokens=8),
            "sampled_exact_match": sampled_exact_match(model, tok, prompts),
        }

    model, tok = load_chat_model(sft_best, device="cpu")
    results["sft_full"]["sampled_exact_match"] = sampled_exact_match(model, tok, prompts)
    # On problems it was trained on: what the model can add up at all (the ceiling RL works under).
    from scratchlm.posttrain.data import load_prompts

    seen = load_prompts(tasks / "prompts-train.jsonl").items[:200]
    results["sft_full"]["exact_match_on_200_training_problems"] = exact_match(model, tok, seen, max_tokens=8)[
        "exact_match"
    ]

    # Reward model: the SFT model plus a scalar head, on correct-vs-near-miss pairs.
    start = time.perf_counter()
    reused = finished(work / "rm")
    if not reused:
        train_reward_model(
            {
                "base": sft_best,
                "data": str(tasks / "pairs-train.jsonl"),
                "val_data": str(tasks / "pairs-test.jsonl"),
            },
            {
                "out_dir": str(work / "rm"),
                "max_steps": rl_steps,
                "eval_interval": rl_steps // 4,
                "lr": 1e-4,
                "batch_size": 32,
            },
            progress=False,
        )
    evals = read_evaluations(work / "rm", "val_accuracy")
    results["reward_model"] = {
        "held_out_pair_accuracy": [(r["step"], r["val_accuracy"]) for r in evals],
        "seconds": reused[1] if reused else time.perf_counter() - start,
    }
    print(f"reward model: held-out pair accuracy {evals[-1]['val_accuracy']:.1%}")

    def rl_run(name: str, run, method: dict, train: dict, reward_key: str) -> None:
        start = time.perf_counter()
        reused = finished(work / name)
        if not reused:
            run(
                {
                    "base": sft_best,
                    "data": str(tasks / "prompts-train.jsonl"),
                    "val_data": str(tasks / "prompts-test.jsonl"),
                    "max_new_tokens": 8,
                    **method,
                },
                {
                    "out_dir": str(work / name),
                    "max_steps": rl_steps,
                    "eval_interval": rl_steps // 4,
                    "batch_size": 32,
                    "eval_windows": 200,
                    "sample_tokens": 0,
                    **train,
                },
                progress=False,
            )
        steps = read_evaluations(work / name, "loss")
        k = max(1, len(steps) // 10)
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        kl_key = "kl" if name == "grpo" else "objective/kl"
        results[name] = {
            **measured(name),
            "seconds": reused[1] if reused else time.perf_counter() - start,
            "settings": {**method, **train},
            f"{reward_key} (first 10% of steps)": mean(steps[:k], reward_key),
            f"{reward_key} (last 10% of steps)": mean(steps[-k:], reward_key),
            f"{kl_key} (last 10% of steps)": mean(steps[-k:], kl_key),
        }
        d = results[name]
        print(
            f"{name}: {reward_key} {d[f'{reward_key} (first 10% of steps)']:.3f} -> "
            f"{d[f'{reward_key} (last 10% of steps)']:.3f}, exact match {d['exact_match']:.1%} (sampled "
            f"{d['sampled_exact_match']:.1%}), {d['seconds']:.0f} s"
        )

    # GRPO with the verifier: 16 prompts x 8 samples per rollout, 4 steps per rollout.
    rl_run(
        "grpo",
        grpo,
        {"prompts_per_rollout": 16, "samples_per_prompt": 8, "kl_coef": 0.04},
        {"lr": 3e-5},
        "reward",
    )
    # PPO with the reward model: 32 prompts x 1 sample, 4 epochs of one step each.
    rl_run(
        "ppo",
        ppo,
        {
            "reward_model": str(work / "rm" / "best"),
            "prompts_per_rollout": 32,
            "samples_per_prompt": 1,
            "epochs": 4,
            "kl_coef": 0.05,
        },
        {"lr": 3e-5},
        "objective/scores",
    )


SUFFIX = " is the sum"  # the prose half of the imperfect demonstrations add after the answer


def format_section(
    work: Path, results: dict, prompts, finished, sft_steps: int, rl_steps: int, dpo_steps: int
) -> None:
    """Imperfect demonstrations: half of the SFT replies add prose after the answer ("42 is the
    sum"); the verifier accepts the bare answer only. The SFT model has both behaviours, and
    GRPO, PPO (with a reward model that prefers the bare answer) and DPO (bare ≻ wrapped pairs)
    can each select the one that is rewarded: a split where SFT alone is imperfect for a reason
    the model can fix (the addition itself is at this model's capacity, see rl_section)."""
    import hashlib
    import json

    from scratchlm.posttrain.dpo import dpo
    from scratchlm.posttrain.evaluate import exact_match
    from scratchlm.posttrain.reward import load_reward_model, train_reward_model
    from scratchlm.posttrain.rl.grpo import grpo
    from scratchlm.posttrain.rl.ppo import ppo
    from scratchlm.posttrain.sft import sft
    from scratchlm.serve.chat import generate_replies, load_chat_model
    from scratchlm.train.metrics import read_evaluations

    tasks = work / "tasks"
    mixed = work / "mixed"
    mixed.mkdir(exist_ok=True)
    wrapped = lambda text: int(hashlib.sha256(text.encode()).hexdigest(), 16) % 2 == 0  # noqa: E731
    with open(tasks / "sft-train.jsonl") as f, open(mixed / "sft-train.jsonl", "w") as out:
        for line in f:
            r = json.loads(line)
            user, reply = r["messages"][0]["content"], r["messages"][1]["content"]
            if wrapped(user):
                r["messages"][1]["content"] = f"{reply}{SUFFIX}"
            out.write(json.dumps(r) + "\n")
    with open(tasks / "pairs-train.jsonl") as f, open(mixed / "pairs-train.jsonl", "w") as out:
        for line in f:  # bare right answer ≻ the same with prose; and ≻ a near miss
            r = json.loads(line)
            out.write(json.dumps({**r, "rejected": f"{r['chosen']}{SUFFIX}"}) + "\n")
            out.write(json.dumps(r) + "\n")
    with open(tasks / "pairs-test.jsonl") as f, open(mixed / "pairs-test.jsonl", "w") as out:
        for line in f:
            r = json.loads(line)
            out.write(json.dumps({**r, "rejected": f"{r['chosen']}{SUFFIX}"}) + "\n")

    def measured(run: str, which: str = "last") -> dict:
        model, tok = load_chat_model(work / run / which, device="cpu")
        replies = generate_replies(model, tok, [p.prompt for p in prompts], 24)
        return {
            **exact_match(model, tok, prompts, max_tokens=24),
            "bare_answer_rate": sum(not r["text"].endswith(SUFFIX) for r in replies) / len(replies),
            "right_answer_either_format": sum(
                r["text"].removesuffix(SUFFIX).strip() == p.answer for p, r in zip(prompts, replies)
            )
            / len(replies),
        }

    def timed(name: str, make) -> float:
        start = time.perf_counter()
        reused = finished(work / name)
        if not reused:
            make()
        return reused[1] if reused else time.perf_counter() - start

    out: dict = {}
    seconds = timed(
        "mixed-sft",
        lambda: sft(
            {
                "base": str(work / "base" / "best"),
                "data": str(mixed / "sft-train.jsonl"),
                "val_data": str(tasks / "sft-test.jsonl"),
            },
            {
                "out_dir": str(work / "mixed-sft"),
                "max_steps": sft_steps,
                "eval_interval": sft_steps // 4,
                "batch_size": 32,
                "lr": 1e-3,
            },
            progress=False,
        ),
    )
    out["sft"] = {**measured("mixed-sft", "best"), "seconds": seconds}
    start_model = str(work / "mixed-sft" / "best")
    rl_common = {
        "base": start_model,
        "data": str(tasks / "prompts-train.jsonl"),
        "val_data": str(tasks / "prompts-test.jsonl"),
        "max_new_tokens": 24,
    }
    rl_train = {
        "max_steps": rl_steps,
        "eval_interval": rl_steps // 4,
        "batch_size": 32,
        "eval_windows": 200,
        "sample_tokens": 0,
        "lr": 3e-5,
    }
    seconds = timed(
        "mixed-grpo",
        lambda: grpo(
            {**rl_common, "prompts_per_rollout": 16, "samples_per_prompt": 8, "kl_coef": 0.04},
            {**rl_train, "out_dir": str(work / "mixed-grpo")},
            progress=False,
        ),
    )
    out["grpo"] = {**measured("mixed-grpo"), "seconds": seconds}
    seconds = timed(
        "mixed-rm",
        lambda: train_reward_model(
            {
                "base": start_model,
                "data": str(mixed / "pairs-train.jsonl"),
                "val_data": str(mixed / "pairs-test.jsonl"),
            },
            {
                "out_dir": str(work / "mixed-rm"),
                "max_steps": rl_steps,
                "eval_interval": rl_steps // 4,
                "lr": 1e-4,
                "batch_size": 32,
            },
            progress=False,
        ),
    )
    rm_evals = read_evaluations(work / "mixed-rm", "val_accuracy")
    out["reward_model"] = {
        "held_out_pair_accuracy (bare vs with prose)": rm_evals[-1]["val_accuracy"],
        "seconds": seconds,
    }
    seconds = timed(
        "mixed-ppo",
        lambda: ppo(
            {
                **rl_common,
                "reward_model": str(work / "mixed-rm" / "best"),
                "prompts_per_rollout": 32,
                "samples_per_prompt": 1,
                "epochs": 4,
                "kl_coef": 0.05,
            },
            {**rl_train, "out_dir": str(work / "mixed-ppo")},
            progress=False,
        ),
    )
    steps = read_evaluations(work / "mixed-ppo", "loss")
    k = max(1, len(steps) // 10)
    out["ppo"] = {
        **measured("mixed-ppo"),
        "seconds": seconds,
        "objective/scores (first 10% of steps)": sum(r["objective/scores"] for r in steps[:k]) / k,
        "objective/scores (last 10% of steps)": sum(r["objective/scores"] for r in steps[-k:]) / k,
        "objective/kl (last 10% of steps)": sum(r["objective/kl"] for r in steps[-k:]) / k,
    }

    def mixed_dpo(name: str, pairs: Path, **settings) -> dict:
        """DPO from the imperfect-split SFT model on ``pairs``: exact match, time, preference accuracy."""
        seconds = timed(
            name,
            lambda: dpo(
                {
                    "base": start_model,
                    "data": str(pairs / "pairs-train.jsonl"),
                    "val_data": str(pairs / "pairs-test.jsonl"),
                    **settings,
                },
                {
                    "out_dir": str(work / name),
                    "max_steps": dpo_steps,
                    "eval_interval": dpo_steps // 2,
                    "lr": 1e-4,
                    "batch_size": 32,
                },
                progress=False,
            ),
        )
        evals = read_evaluations(work / name, "val_loss")
        return {
            **measured(name),
            "seconds": seconds,
            "preference_accuracy_before": evals[0]["val_reference_preference_accuracy"],
            "preference_accuracy_after": evals[-1]["val_preference_accuracy"],
        }

    out["dpo"] = mixed_dpo("mixed-dpo", mixed)
    # DPO with the RPO term on the plain right ≻ near-miss pairs (their chosen replies are bare).
    out["dpo_rpo_right_vs_near_miss"] = mixed_dpo("mixed-dpo-correct", tasks, rpo_alpha=1.0)
    rm = load_reward_model(work / "mixed-rm" / "best")
    out["reward_model"]["mean_score_of_greedy_replies"] = {}
    for run, which in (("mixed-sft", "best"), ("mixed-ppo", "last")):
        replies = generate_replies(
            *load_chat_model(work / run / which, device="cpu"), [p.prompt for p in prompts], 24
        )
        scores = rm([p.prompt for p in prompts], [r["text"] for r in replies])
        out["reward_model"]["mean_score_of_greedy_replies"][run] = scores.mean().item()
    results["imperfect_demonstrations"] = out
    for name, d in out.items():
        if "exact_match" in d:
            print(
                f"mixed {name}: exact match {d['exact_match']:.1%}, bare answers {d['bare_answer_rate']:.1%}, right in "
                f"either format {d['right_answer_either_format']:.1%}, {d['seconds']:.0f} s"
            )


if __name__ == "__main__":
    main()
