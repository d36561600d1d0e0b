"""Constitutional AI as a loop, measured, on a CPU, from nothing:

1. a small "assistant" made for the purpose: a random-init GPT fine-tuned (SFT) on 2-digit
   additions answered in six styles, of which one follows every principle below ("answer 42")
   and the others break one to three ("the answer is 42", "maybe 42", "42", "answer 42 i think",
   "answer maybe 42"). A quarter of its conversations open with a system message in the loop's
   own revision format (the earlier reply, some principles with their critiques) and a reply
   that follows the principles named: a stand-in for what Constitutional AI starts from, a model
   that follows instructions given in context but not by default (``--no-instruction-data``
   leaves these out: a model that has never seen a system message);
2. three checkable principles: at most 12 characters; never "maybe" or "think"; the form
   "answer N";
3. ``critique_revise`` for three rounds (k = 8 candidates, 400 prompts) of SFT on the better
   revisions, one pass at lr 1e-4 per round; the same with revisions sampled from the plain
   prompt (``instruct=False``: best-of-k alone, the critic doing all the work); DPO on
   (revision ≻ original) pairs, three passes per round; and DPO with the RPO term (``rpo_alpha=1``);
4. held-out compliance on 200 unseen problems before and after each round: of the greedy replies,
   and of one seeded sample per prompt at temperature 1.

    python benchmarks/critique_revise.py [--quick] [--no-instruction-data]   # -> benchmarks/results/critique_revise.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from common import save

STYLES = [
    ("the answer is {a}", 3),
    ("maybe {a}", 2),
    ("{a}", 2),
    ("answer {a} i think", 2),
    ("answer maybe {a}", 1),
    ("answer {a}", 1),
]
PRINCIPLES = [
    {"name": "concise", "text": "at most 12 characters", "check": {"kind": "max_chars", "limit": 12}},
    {
        "name": "no_hedging",
        "text": "never say maybe or think",
        "check": {"kind": "forbidden_words", "words": ["maybe", "think"]},
    },
    {
        "name": "format",
        "text": "say answer and the number",
        "check": {"kind": "regex", "pattern": r"answer \d+"},
    },
]


def assistant_data(problems, tokenizer, rng: random.Random, instruct_fraction: float) -> list[dict]:
    """SFT conversations: each problem answered in a style drawn by STYLES' weights; a fraction
    opens with a revision-format system message naming some principles the earlier reply broke,
    and the reply is a style that follows those (any of them, at random)."""
    from scratchlm.posttrain.critique.critics import Constitution
    from scratchlm.posttrain.critique.loop import revision_prompt
    from scratchlm.posttrain.critique.principles import parse_principles

    principles = parse_principles(PRINCIPLES)
    constitution = Constitution(principles)
    styles, weights = [s for s, _ in STYLES], [w for _, w in STYLES]
    rows = []
    for p in problems:
        user = [{"role": "user", "content": p.prompt}]
        if rng.random() >= instruct_fraction:
            reply = rng.choices(styles, weights)[0].format(a=p.answer)
            rows.append({"messages": user + [{"role": "assistant", "content": reply}]})
            continue
        original = rng.choices(styles[:-1], weights[:-1])[0].format(a=p.answer)
        critiques = constitution.evaluate([user], [original])[0].critiques
        broken = [(pr, c) for pr, c in zip(principles, critiques) if not c.satisfied]
        named = [b for b in broken if rng.random() < 0.7] or broken[:1]  # the loop names every one; here some
        names = {pr.name for pr, _ in named}
        replies = [s.format(a=p.answer) for s in styles]
        follows = [
            r
            for r in replies
            if all(
                c.satisfied
                for pr, c in zip(principles, constitution.evaluate([user], [r])[0].critiques)
                if pr.name in names
            )
        ]
        rows.append(
            {
                "messages": revision_prompt(user, original, named, tokenizer)
                + [{"role": "assistant", "content": rng.choice(follows)}]
            }
        )
    return rows


def main() -> None:
    import torch

    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.posttrain.critique.loop import critique_revise
    from scratchlm.posttrain.data import write_task_data
    from scratchlm.posttrain.sft import sft
    from scratchlm.posttrain.tasks import make_problems
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.tokenizers.chat import add_chat_tokens

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer steps and prompts: a smoke run")
    p.add_argument(
        "--no-instruction-data", action="store_true", help="an assistant that never saw a system message"
    )
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="with --out: keep the assistant trained there")
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(args.out or tempfile.mkdtemp())
    base_steps, loop_prompts, test, rounds, samples = (
        (300, 100, 50, 2, 4) if args.quick else (600, 400, 200, 3, 8)
    )
    instruct_fraction = 0.0 if args.no_instruction_data else 0.25
    round_train = {"lr": 1e-4, "batch_size": 16}  # small steps per round (one pass over its data, below)
    results: dict = {
        "principles": PRINCIPLES,
        "styles": dict(STYLES),
        "assistant_steps": base_steps,
        "instruction_data": instruct_fraction,
        "loop_prompts": loop_prompts,
        "held_out_prompts": test,
        "rounds": rounds,
        "samples": samples,
        "round_train": round_train,
        "threads": torch.get_num_threads(),
    }

    start = time.perf_counter()
    write_task_data(work / "tasks", ["addition"], train=3000, test=test, difficulty=2)
    tok = CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz:", ["<|endoftext|>"])
    rows = assistant_data(
        make_problems("addition", 3000, "train", 2), add_chat_tokens(tok), random.Random(0), instruct_fraction
    )
    with open(work / "assistant.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    prompts = [json.loads(line) for line in (work / "tasks" / "prompts-train.jsonl").read_text().splitlines()]
    with open(work / "loop-prompts.jsonl", "w") as f:  # problems the assistant was trained on, asked again
        f.writelines(json.dumps(r) + "\n" for r in prompts[:loop_prompts])
    (work / "principles.json").write_text(json.dumps(PRINCIPLES, indent=1))

    if not (args.reuse and (work / "assistant" / "last").exists()):
        base = GPT(
            GPTConfig(
                vocab_size=tok.vocab_size,
                n_layer=4,
                n_head=4,
                d_model=128,
                block_size=288,
                position="rope",
                norm="rmsnorm",
                mlp="swiglu",
                bias=False,
                dropout=0.0,
            )
        )
        save_model_only(work / "init", base, tokenizer=tok)
        sft(
            {"base": str(work / "init"), "data": str(work / "assistant.jsonl")},
            {
                "out_dir": str(work / "assistant"),
                "max_steps": base_steps,
                "eval_interval": base_steps,
                "batch_size": 16,
                "lr": 1e-3,
                "warmup_steps": 50,
            },
            progress=False,
            overwrite=True,
        )
    results["seconds_assistant"] = time.perf_counter() - start
    print(f"assistant trained ({results['seconds_assistant']:.0f} s)")

    runs = {
        "sft": {"epochs": 1},
        "sft_plain_prompt": {"epochs": 1, "instruct": False},
        "dpo": {"method": "dpo", "epochs": 3},
        "dpo_rpo": {"method": "dpo", "epochs": 3, "method_config": {"rpo_alpha": 1.0}},
    }
    for name, extra in runs.items():
        start = time.perf_counter()
        settings = {
            "rounds": rounds,
            "samples": samples,
            "max_tokens": 24,
            "train_config": round_train,
            **extra,
        }
        r = critique_revise(
            work / "assistant" / "last",
            work / "loop-prompts.jsonl",
            work / "principles.json",
            work / f"loop-{name}",
            eval_prompts=work / "tasks" / "prompts-test.jsonl",
            overwrite=True,
            progress=False,
            **settings,
        )
        results[name] = {
            "settings": {
                k: v
                for k, v in r["settings"].items()
                if k in ("method", "instruct", "epochs", "train_config", "method_config")
            },
            "seconds": time.perf_counter() - start,
            "compliance": [c["all"] for c in r["compliance"]],
            "sampled_compliance": [c["sampled_all"] for c in r["compliance"]],
            "per_principle": [c["per_principle"] for c in r["compliance"]],
            "contains_answer": [c.get("contains_answer") for c in r["compliance"]],
            "ended_with_end_of_turn": [c["ended_with_end_of_turn"] for c in r["compliance"]],
            "examples": [c["examples"][:2] for c in r["compliance"]],
            "rounds": [
                {k: v for k, v in rd.items() if k not in ("start", "checkpoint")} for rd in r["rounds"]
            ],
            "stop_reason": r["stop_reason"],
        }
        d = results[name]
        print(
            f"{name}: held-out compliance "
            + " -> ".join(f"{c:.1%}" for c in d["compliance"])
            + " (sampled "
            + " -> ".join(f"{c:.1%}" for c in d["sampled_compliance"])
            + "); candidates complying "
            + ", ".join(f"{rd['candidates_complying']}/{rd['candidates']}" for rd in d["rounds"])
            + f"; contains the answer {d['contains_answer'][0]:.1%} -> {d['contains_answer'][-1]:.1%}; {d['seconds']:.0f} s"
        )
    name = (
        "critique_revise"
        + ("_quick" if args.quick else "")
        + ("_no_instruction_data" if args.no_instruction_data else "")
    )
    print(f"wrote {save(name, results)}")


if __name__ == "__main__":
    main()
