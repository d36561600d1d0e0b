"""Constitutional AI as a loop: generate → critique against principles → revise → train.

Bai et al. (2022), *Constitutional AI*, replace most human feedback with a short written list of
principles (the "constitution"). Its supervised stage (SL-CAI) asks the model for a reply, asks
it to *critique* that reply against a principle, asks it to *revise* the reply in the light of
the critique, and fine-tunes on the revisions. Its RL stage (RL-CAI) turns the same judgement
into preferences — the better reply ≻ the worse — and learns from those. This module is that loop
as a pipeline, one round at a time::

    for each round:
        originals  = the model's replies to the training prompts (seeded samples)
        critiques  = each reply against each principle (a Critique: satisfied?, score, what is wrong)
        revisions  = for each reply that breaks a principle, k seeded samples from the model,
                     prompted with the principle and the critique; the best per the critic
        collect    = only where the revision is *better* than the original:
                     {"messages": prompt + revision} (SFT) and {prompt, chosen: revision, rejected: original}
        train      = scratchlm.posttrain.sft.sft (SL-CAI) or scratchlm.posttrain.dpo.dpo (the
                     preference stage, with DPO standing in for RL), from the round's starting checkpoint
        measure    = held-out compliance before and after: the fraction of replies that satisfy
                     every principle, and each principle alone (greedy replies, and one sample each)

**The critic is pluggable**, per principle (the ``check`` of each principle in the JSON file):

* *programmatic* — what a rule can check: ``max_chars``/``min_chars``, ``max_words``/``min_words``,
  ``forbidden_words``, ``regex`` (an answer format). Exact, free, and the only critic a tiny
  model can learn from (the measured demo uses these).
* ``model`` — the model itself (or another checkpoint) is asked whether the reply follows the
  principle (after the conversation and the reply, the principle last); its answer is the
  critique, and the reply passes if its first word is the pass word ("yes", any case). This is the paper's critic. A model of a few hundred thousand parameters writes noise
  here: the path is real and tested, but useful critiques need a capable model.
* ``scorer`` — any ``Callable[[list[dict], str], float]`` (the prompt messages, the reply) under a
  name; the reply passes if the score reaches ``threshold``. A reward model's scalar score fits
  here (:class:`~scratchlm.posttrain.critique.critics.RewardScorer`, batched over
  :mod:`scratchlm.posttrain.reward`; the CLI's ``--reward-model``), as do heuristics, classifiers, or a call to a larger model.

**Which reply is better.** Every constitution has one unwritten rule: a reply ends its turn with
``<|im_end|>`` (one cut off by the token budget complies with nothing as a whole, and is never
learned as a revision). A reply's key is (rules satisfied, counting that one; sum of the critics'
scores): more rules satisfied wins; at a tie, the higher total score (a programmatic score is 1
when satisfied and grows towards 1 as a reply approaches the rule — 40 characters against a limit
of 20 scores 0.5 — a model critic scores 1 or 0, a scorer its own value). Critiques written by the
programmatic checks are terse ("it has 16 characters, more than 12"): a small model reads them.

**What revising means for a tiny model.** The revision prompt puts the original reply, the
broken principles and their critiques in a system message before the original conversation. A
model that has learned to follow such instructions revises; a tiny model reads them only if it
was trained on that format, and one that never saw a system message writes noise when given one
— noise that can beat the originals on a critic that checks only part of what matters (short,
no forbidden word), which the loop then teaches. ``instruct=False`` samples the candidates from
the plain prompt instead: best-of-k rejection sampling (expert iteration, ReST), the critic doing
the work the model cannot. ``docs/critique-revise.md`` measures all three cases.

The principles and their checks are :mod:`~scratchlm.posttrain.critique.principles`, the critics
:mod:`~scratchlm.posttrain.critique.critics`. This module runs past 400 lines (an eighth of them
this description) because one round — generate, critique, revise, collect, train, measure — and
the run folder's claim and resume read best in one place.

    scratchlm critique-revise --checkpoint runs/sft/best --prompts prompts.jsonl --principles principles.json \\
        --out runs/cai [--rounds 3] [--samples 8] [--method sft|dpo]
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from scratchlm.config import Rule
from scratchlm.io import atomic_write, read_json, sha256_file, write_json
from scratchlm.posttrain.critique.critics import (
    Constitution,
    Scorer,
    scorer_identity,
    speakable,
    without_special_tokens,
)
from scratchlm.posttrain.critique.principles import (
    Critique,
    Evaluation,
    Principle,
    load_principles,
    parse_principles,
)
from scratchlm.serve.chat import load_chat_model

if TYPE_CHECKING:
    from scratchlm.posttrain.data import PromptWithAnswer

RESULTS_FORMAT = "scratchlm.critique-revise"

# What the model reads when it revises (plain lowercase words, like the critique request).
REVISION_REQUEST = "your reply: {reply}\n{problems}\nwrite a better one"


# --- the model: sampling seeds -------------------------------------------------------------------
def seed_for(*parts: int) -> int:
    """A request's seed from (run seed, round, prompt, sample): distinct, stable, < 2**63."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def revision_prompt(
    prompt: list[dict],
    original: str,
    problems: list[tuple[Principle, Critique]],
    tokenizer,
    ended: bool = True,
) -> list[dict]:
    """The conversation a revision is sampled from: a system message with the original reply and,
    for each broken principle, its text and its critique; then the original conversation."""
    lines = "\n".join([f"{p.text}: {c.text}" for p, c in problems] + ([] if ended else ["it never ended"]))
    system = speakable(
        without_special_tokens(REVISION_REQUEST.format(reply=original.strip(), problems=lines), tokenizer),
        tokenizer,
    )
    if prompt[0]["role"] == "system":  # one system message: ours after the conversation's own
        return [{"role": "system", "content": prompt[0]["content"] + "\n" + system}, *prompt[1:]]
    return [{"role": "system", "content": system}, *prompt]


# --- prompts ------------------------------------------------------------------------------------
def contains_answer(answer: str, reply: str) -> bool:
    """The reference answer appears in the reply as a whole word or number ("answer 42" contains 42)."""
    return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", reply) is not None


# --- measuring ----------------------------------------------------------------------------------
def compliance(
    model,
    tokenizer,
    constitution: Constitution,
    items: list[PromptWithAnswer],
    *,
    max_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """Held-out compliance of greedy replies — every principle (``all``) and each alone — and the
    same for one seeded sample per prompt (``sampled_all``: it moves smoothly where the greedy
    reply flips at once); the fraction of replies ending with <|im_end|>; their mean length; and,
    where prompts have answers, how often the greedy reply contains the answer (``contains_answer``)."""
    from scratchlm.serve.chat import generate_replies

    prompts = [it.prompt for it in items]
    greedy = generate_replies(model, tokenizer, prompts, max_tokens)
    sampled = generate_replies(
        model,
        tokenizer,
        prompts,
        max_tokens,
        temperature=temperature,
        seeds=[seed_for(seed, "eval", i) for i in range(len(items))],
    )
    evals = constitution.evaluate(prompts, [r["text"] for r in greedy], [r["ended"] for r in greedy])
    sampled_evals = constitution.evaluate(
        prompts, [r["text"] for r in sampled], [r["ended"] for r in sampled]
    )
    n = len(items)
    out = {
        "all": sum(e.complies for e in evals) / n,
        "per_principle": {
            p.name: sum(e.critiques[j].satisfied for e in evals) / n
            for j, p in enumerate(constitution.principles)
        },
        "sampled_all": sum(e.complies for e in sampled_evals) / n,
        "ended_with_end_of_turn": sum(r["ended"] for r in greedy) / n,
        "mean_chars": sum(len(r["text"].strip()) for r in greedy) / n,
        "n": n,
        "examples": [{"prompt": p[-1]["content"], "reply": r["text"]} for p, r in zip(prompts[:3], greedy)],
    }
    with_answers = [(it, r) for it, r in zip(items, greedy) if it.answer is not None]
    if with_answers:
        out["contains_answer"] = sum(contains_answer(it.answer, r["text"]) for it, r in with_answers) / len(
            with_answers
        )
    return out


# --- the loop -----------------------------------------------------------------------------------
# [train] defaults for a round where they differ from SFT's and DPO's. The number of steps follows
# the data (Settings.epochs passes over it, unless train.max_steps is given): a fixed count would
# run hundreds of epochs over the handful of revisions a late round collects, and overfit to them.
# A tenth of the steps warm up; one evaluation at the end, of the round's own data (what matters
# is measured by the loop, on held-out prompts).
ROUND_TRAIN_DEFAULTS = {"sample_tokens": 0, "log_interval": 25}


@dataclass
class Settings:
    rounds: int = 1
    samples: int = 4  # k: revision candidates per reply that breaks a principle
    method: str = "sft"  # sft: learn the revisions; dpo: learn revision ≻ original
    temperature: float = 1.0  # for the originals, the revision candidates and the sampled compliance
    max_tokens: int = 32  # reply length at most
    held_out: float = 0.2  # fraction of --prompts kept for measuring (unless eval prompts are given)
    seed: int = 0
    instruct: bool = True  # False: revisions sampled from the plain prompt (best-of-k alone, an ablation)
    epochs: float = 3.0  # passes over a round's data (sets train.max_steps unless that is given)
    method_config: dict = field(default_factory=dict)  # extra [sft] / [dpo] fields (lora_rank, beta, ...)
    train_config: dict = field(default_factory=dict)  # [train] fields for every round (max_steps, lr, ...)

    def __post_init__(self):
        for name, rule in _SETTINGS_RULES.items():
            rule.require(getattr(self, name), f"critique-revise {name}")


_SETTINGS_RULES = {
    "rounds": Rule(type=int, min=1),
    "samples": Rule(type=int, min=1),
    "method": Rule(choices=("sft", "dpo"), expected="'sft' or 'dpo'"),
    "temperature": Rule(type=float, above=0),
    "max_tokens": Rule(type=int, min=1),
    "held_out": Rule(type=float, min=0, below=1),
    "epochs": Rule(type=float, above=0),
}


RESERVED_METHOD_KEYS = ("base", "data", "val_data", "tokenizer")  # set by the loop for each round


def critique_revise(
    checkpoint: str | Path,
    prompts: str | Path,
    principles: str | Path | list,
    out: str | Path,
    *,
    eval_prompts: str | Path | None = None,
    scorers: dict[str, Scorer] | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    skip_invalid: bool = False,
    log=None,
    **settings,
) -> dict:
    """Run ``settings["rounds"]`` rounds of generate → critique → revise → train from ``checkpoint``.

    ``prompts``: JSONL of ``{"prompt", "answer"?}``; ``principles``: a JSON file or the list itself;
    ``settings``: the fields of :class:`Settings`. Writes into ``out``: ``results.json`` (after the
    starting measurement, and after each round) and ``round-N/`` (critiques.jsonl, sft.jsonl,
    pairs.jsonl, the training run in train/, round.json), each atomically. Everything is checked
    (principles, prompts, the checkpoint, scorers, the [sft]/[dpo]/[train] fields) before ``out`` is
    claimed, so a mistake never costs a previous run. ``resume`` keeps the finished rounds of an
    interrupted run with the same inputs (``rounds`` may grow, never shrink); an unfinished round is
    redone from its start. A scorer is known by its ``identity`` attribute if it has one, else by
    its module and name. Returns the results (also ``results.json``)."""
    from scratchlm.posttrain.data import load_prompts, split_held_out

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    s = Settings(**settings)
    principle_list = (
        parse_principles(principles) if isinstance(principles, list) else load_principles(principles)
    )
    out = Path(out)
    _check_training_fields(s, checkpoint, prompts)
    loaded = load_prompts(prompts, skip_invalid, require_answer=False)
    if eval_prompts:
        train_items, held = loaded.items, load_prompts(eval_prompts, skip_invalid, require_answer=False).items
    else:
        train_items, held = split_held_out(loaded.items, lambda it: it.prompt, s.held_out)
    if not train_items or not held:
        raise ValueError(
            f"{len(train_items)} training and {len(held)} held-out prompts: both are needed; give "
            f"--eval-prompts, or change --held-out (now {s.held_out})"
        )
    scorers = dict(scorers or {})
    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "prompts": str(Path(prompts).resolve()),
        "prompts_sha256": sha256_file(Path(prompts)),
        "eval_prompts": str(Path(eval_prompts).resolve()) if eval_prompts else None,
        "eval_prompts_sha256": sha256_file(Path(eval_prompts)) if eval_prompts else None,
        "principles": [p.__dict__ for p in principle_list],
        "settings": s.__dict__,
        "tokenizer": tokenizer,
        "scorers": {name: scorer_identity(fn) for name, fn in sorted(scorers.items())},
    }

    # Everything that can fail is checked before the folder is claimed (--overwrite deletes a run).
    start_model, start_tokenizer = load_chat_model(record["checkpoint"], tokenizer, device)
    uses_start_critic = any(
        p.check["kind"] == "model" and p.check["checkpoint"] is None for p in principle_list
    )
    constitution = Constitution(
        principle_list,
        model=start_model if uses_start_critic else None,
        tokenizer=start_tokenizer,
        scorers=scorers,
        device=device,
    )
    _check_prompts(train_items + held, start_tokenizer)
    if not 0 < s.max_tokens < start_model.config.block_size:
        raise ValueError(
            f"max_tokens must be in (0, {start_model.config.block_size}) for this model's context, "
            f"got {s.max_tokens}"
        )
    results = _claim(out, record, resume, overwrite)
    results["prompts_count"] = {"train": len(train_items), "held_out": len(held)}

    measure = dict(max_tokens=s.max_tokens, temperature=s.temperature, seed=s.seed)
    if not results["compliance"]:
        results["compliance"].append(compliance(start_model, start_tokenizer, constitution, held, **measure))
        write_json(out / "results.json", results)  # from here on the run can be resumed
    del start_model  # a model critic keeps its own reference; otherwise the memory is freed
    current = record["checkpoint"]
    for done in results["rounds"]:
        current = done["checkpoint"] or current
    log(
        f"start: held-out compliance {results['compliance'][0]['all']:.1%} ({len(held)} prompts), "
        f"{len(train_items)} training prompts, {len(principle_list)} principles"
    )
    if str(results.get("stop_reason", "")).endswith("collected nothing"):  # an early stop stays a stop
        log(f"{out} stopped early ({results['stop_reason']}): nothing more to do")
        return results
    for number in range(len(results["rounds"]) + 1, s.rounds + 1):
        started = time.perf_counter()
        folder = out / f"round-{number}"
        if folder.exists():  # an interrupted round: redone from its start
            shutil.rmtree(folder)
        round_tokenizer = (
            tokenizer if current == record["checkpoint"] else None
        )  # later checkpoints carry theirs
        model, tok = load_chat_model(current, round_tokenizer, device)
        collected = _one_round(model, tok, constitution, train_items, s, number, folder, progress, log)
        del model  # freed before training loads the same checkpoint again
        counts = collected["counts"]
        round_record = {"round": number, "start": current, **counts, "checkpoint": None}
        if counts["collected"]:
            summary = _train(s, number, current, folder, counts["collected"], round_tokenizer, progress)
            current = str(Path(summary["out_dir"]) / "last")
            round_record["checkpoint"] = current
            round_record["train"] = {
                k: summary.get(k) for k in ("steps", "stop_reason", "best_val_loss", "seconds")
            }
            model, tok = load_chat_model(current, device=device)
            after = compliance(model, tok, constitution, held, **measure)
            del model
        else:
            if counts["revised"]:  # DPO: better revisions, but not one renderable pair that differs
                log(
                    f"round {number}: {counts['revised']} revisions were better than their originals, but none made a "
                    "preference pair (each original had a special token's text or equalled its revision): nothing "
                    "to train on"
                )
            else:
                log(f"round {number}: no revision was better than its original: nothing to train on")
            after = results["compliance"][-1]
        round_record.update(
            {
                "compliance_before": results["compliance"][-1]["all"],
                "compliance_after": after["all"],
                "seconds": time.perf_counter() - started,
            }
        )
        write_json(folder / "round.json", {"format": RESULTS_FORMAT + ".round", "version": 1, **round_record})
        results["rounds"].append(round_record)
        results["compliance"].append(after)
        results["final_checkpoint"] = current
        if not counts["collected"]:
            results["stop_reason"] = f"round {number} collected nothing"
        write_json(out / "results.json", results)
        log(
            f"round {number}: {round_record['violating']} of {round_record['originals']} replies broke a principle, "
            f"{round_record['revised']} better revisions found ({round_record['pairs']} pairs); held-out compliance "
            f"{round_record['compliance_before']:.1%} -> {after['all']:.1%} ({round_record['seconds']:.0f} s)"
        )
        if not counts["collected"]:
            break
    else:
        results["stop_reason"] = "rounds"
    results["final_checkpoint"] = current
    write_json(out / "results.json", results)
    return results


def _check_training_fields(s: Settings, checkpoint, prompts) -> None:
    """The [sft]/[dpo] and [train] fields, checked as the trainer will check them (a typo fails now,
    not after round 1's generation); the keys the loop sets itself are refused."""
    from scratchlm.posttrain.base import CHAT_TRAIN_DEFAULTS
    from scratchlm.train.config import TrainConfig

    if s.method == "sft":
        from scratchlm.posttrain.sft import SFTConfig as MethodConfig
    else:
        from scratchlm.posttrain.dpo import DPOConfig as MethodConfig
    reserved = [k for k in RESERVED_METHOD_KEYS if k in s.method_config]
    if reserved:
        raise ValueError(
            f"{s.method}.{reserved[0]} is set by the loop for each round (the round's starting "
            "checkpoint, its data, its tokenizer): give the starting checkpoint as --checkpoint and its "
            "tokenizer as --tokenizer, and leave it out of --set"
        )
    if "out_dir" in s.train_config:
        raise ValueError(
            "train.out_dir is set by the loop (each round trains into --out/round-N/train): choose the "
            "folder with --out, and leave train.out_dir out of --set"
        )
    method = MethodConfig.from_dict({"base": str(checkpoint), "data": str(prompts), **s.method_config})
    # Merged as the trainer will merge it (sft() and dpo() pick lr by method and LoRA).
    lr = {("sft", False): 3e-4, ("sft", True): 2e-3, ("dpo", False): 1e-5, ("dpo", True): 1e-4}[
        s.method, bool(method.lora_rank)
    ]
    TrainConfig.from_dict(
        {
            **CHAT_TRAIN_DEFAULTS,
            "lr": lr,
            **ROUND_TRAIN_DEFAULTS,
            "max_steps": 1,
            **s.train_config,
            "out_dir": "unused",
        }
    )


def _check_prompts(items: list[PromptWithAnswer], tokenizer) -> None:
    """Every prompt renders (no special token as text, no character the tokenizer lacks), or the
    error names its file and line."""
    from scratchlm.tokenizers.chat import ChatTemplate

    template = ChatTemplate(tokenizer)
    for it in items:
        try:
            template.prompt_ids(it.prompt)
        except ValueError as e:
            raise ValueError(f"{it.where}: {e}") from None


def _identity(record: dict) -> dict:
    """What must match for a resume: every input but the number of rounds and the device."""
    record = json.loads(json.dumps(record))
    settings = {**record["settings"], "rounds": None}
    settings["train_config"] = {k: v for k, v in settings.get("train_config", {}).items() if k != "device"}
    keys = (
        "checkpoint",
        "prompts",
        "prompts_sha256",
        "eval_prompts",
        "eval_prompts_sha256",
        "principles",
        "tokenizer",
        "scorers",
    )
    return {**{k: record.get(k) for k in keys}, "settings": settings}


def _claim(out: Path, record: dict, resume: bool, overwrite: bool) -> dict:
    """The results so far: fresh, or with ``resume`` the finished rounds of the same run."""
    path = out / "results.json"
    if path.exists() and resume:
        previous = read_json(path, RESULTS_FORMAT)
        before, now = _identity(previous), _identity(record)
        changed = [k for k in now if before.get(k) != now[k]]
        if changed:
            raise ValueError(
                f"{path} was made with other {', '.join(changed)}: resume with the same ones (only "
                "--rounds may grow, and --device change), or start over with --overwrite (or another --out)"
            )
        if record["settings"]["rounds"] < len(previous["rounds"]):
            raise ValueError(
                f"{path} holds {len(previous['rounds'])} finished rounds: --rounds "
                f"{record['settings']['rounds']} would drop some; resume with --rounds >= "
                f"{len(previous['rounds'])}, or start over with --overwrite"
            )
        previous["settings"] = record["settings"]
        return previous
    if path.exists() or any(out.glob("round-*")):
        if not (overwrite or (resume and not path.exists())):
            raise FileExistsError(
                f"{out} already holds a critique-revise run; pass --resume to continue it, "
                "--overwrite to start over (its rounds are deleted), or choose another --out"
            )
        # --overwrite; or --resume of a run stopped before its starting measurement was written:
        # its round folders are leftovers, and the run starts afresh.
        for folder in out.glob("round-*"):
            shutil.rmtree(folder)
        path.unlink(missing_ok=True)
    return {"format": RESULTS_FORMAT, "version": 1, **record, "compliance": [], "rounds": []}


def _one_round(
    model,
    tokenizer,
    constitution: Constitution,
    items: list[PromptWithAnswer],
    s: Settings,
    number: int,
    folder: Path,
    progress: bool,
    log,
) -> dict:
    """Generate, critique, revise, collect; write the round's JSONL files."""
    from scratchlm.serve.chat import generate_replies
    from scratchlm.tokenizers.chat import ChatTemplate

    prompts = [it.prompt for it in items]
    context = model.config.block_size
    if not 0 < s.max_tokens < context:
        raise ValueError(f"max_tokens must be in (0, {context}) for this model's context, got {s.max_tokens}")
    log(f"round {number}: replying to {len(prompts)} prompts")
    # Sampled, not greedy: the loop improves the model's whole distribution of replies, and goes on
    # finding replies to revise after the greedy ones comply.
    replies = generate_replies(
        model,
        tokenizer,
        prompts,
        s.max_tokens,
        temperature=s.temperature,
        seeds=[seed_for(s.seed, number, i, "original") for i in range(len(prompts))],
    )
    originals = [r["text"] for r in replies]
    judged = constitution.evaluate(prompts, originals, [r["ended"] for r in replies])
    todo = [i for i, e in enumerate(judged) if not e.complies]
    template, cut = ChatTemplate(tokenizer), 0
    requests, seeds = [], []
    for i in todo:
        problems = [(p, c) for p, c in zip(constitution.principles, judged[i].critiques) if not c.satisfied]
        asked = (
            revision_prompt(prompts[i], originals[i], problems, tokenizer, judged[i].ended)
            if s.instruct
            else prompts[i]
        )
        if len(template.prompt_ids(asked)) + s.max_tokens > context:  # no room: the plain prompt
            asked, cut = prompts[i], cut + 1
        for j in range(s.samples):
            requests.append(asked)
            seeds.append(seed_for(s.seed, number, i, j))
    log(f"round {number}: {len(todo)} replies break a principle; sampling {s.samples} revisions of each")
    candidates = generate_replies(
        model, tokenizer, requests, s.max_tokens, temperature=s.temperature, seeds=seeds, progress=progress
    )
    candidate_evals = constitution.evaluate(
        [prompts[i] for i in todo for _ in range(s.samples)],
        [c["text"] for c in candidates],
        [c["ended"] for c in candidates],
    )
    specials = list(tokenizer.special_tokens)
    learnable = lambda text: not any(name in text for name in specials)  # noqa: E731 (the template refuses them)
    sft_rows, pair_rows = [], []
    lines = [
        {
            "prompt": prompts[i],
            "original": originals[i],
            "original_ended": judged[i].ended,
            "critiques": _critiques(constitution, judged[i]),
            "revision": None,
            "better": False,
        }
        for i in range(len(prompts))
    ]  # every original; those that broke a principle get their revision below
    for n, i in enumerate(todo):
        group = range(n * s.samples, (n + 1) * s.samples)
        # A revision to learn closed its turn, and has no special token's text (a sampled <|im_start|>)
        eligible = [g for g in group if candidates[g]["ended"] and learnable(candidates[g]["text"])]
        best = max(eligible, key=lambda g: candidate_evals[g].key, default=None)  # ties: the first sample
        better = best is not None and candidate_evals[best].key > judged[i].key
        revision = candidates[best]["text"].strip() if best is not None else None
        lines[i].update(
            {
                "revision": revision,
                "revision_critiques": _critiques(constitution, candidate_evals[best])
                if best is not None
                else None,
                "better": better,
                "candidates": [candidates[g]["text"] for g in group],
            }
        )
        if better:
            sft_rows.append({"messages": prompts[i] + [{"role": "assistant", "content": revision}]})
            rejected = originals[i].strip()
            # a pair the template renders, and a real preference
            if learnable(rejected) and rejected != revision:
                pair_rows.append({"prompt": prompts[i], "chosen": revision, "rejected": rejected})
    for name, rows in (("critiques.jsonl", lines), ("sft.jsonl", sft_rows), ("pairs.jsonl", pair_rows)):
        with atomic_write(folder / name, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {
        "counts": {
            "originals": len(prompts),
            "violating": len(todo),
            "candidates": len(candidates),
            "candidates_ended": sum(c["ended"] for c in candidates),
            "candidates_complying": sum(e.complies for e in candidate_evals),
            "revised": len(sft_rows),
            "pairs": len(pair_rows),
            "collected": len(sft_rows if s.method == "sft" else pair_rows),
            "revision_prompts_without_instructions": cut,
        }
    }


def _critiques(constitution: Constitution, evaluation: Evaluation) -> dict:
    return {
        p.name: {"satisfied": c.satisfied, "score": c.score, "critique": c.text}
        for p, c in zip(constitution.principles, evaluation.critiques)
    }


def _train(
    s: Settings, number: int, base: str, folder: Path, rows: int, tokenizer: str | None, progress: bool
) -> dict:
    """One round's training, by the existing trainers: SFT on the revisions, or DPO on the pairs."""
    from scratchlm.posttrain.base import CHAT_TRAIN_DEFAULTS

    data = str(folder / ("sft.jsonl" if s.method == "sft" else "pairs.jsonl"))
    # The round's own data as the trainer's "held-out" set: too few rows to split, and the held-out
    # measure that counts (compliance on unseen prompts) is taken by the loop.
    method = {
        "base": base,
        "data": data,
        "val_data": data,
        **({"tokenizer": tokenizer} if tokenizer else {}),
        **s.method_config,
    }
    train = {
        **ROUND_TRAIN_DEFAULTS,
        "seed": s.seed + number,
        **s.train_config,
        "out_dir": str(folder / "train"),
    }
    batch = train.get("batch_size", CHAT_TRAIN_DEFAULTS["batch_size"])
    train.setdefault("max_steps", max(1, math.ceil(s.epochs * rows / batch)))
    train.setdefault("warmup_steps", train["max_steps"] // 10)
    train.setdefault("eval_interval", train["max_steps"])  # one evaluation, at the end
    if s.method == "sft":
        from scratchlm.posttrain.sft import sft

        return sft(method, train, progress=progress)
    from scratchlm.posttrain.dpo import dpo

    return dpo(method, train, progress=progress)
