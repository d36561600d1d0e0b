"""Post-training data: the JSONL shapes people have, read into conversations, pairs and prompts.

* **SFT** (:func:`load_sft`): one conversation per line, in any of the common shapes —
  ``{"messages": [{"role", "content"}, ...]}`` (chat), ``{"instruction", "input", "output"}``
  (Alpaca; ``input`` optional), ``{"prompt", "completion"}``.
* **Preference pairs** (:func:`load_pairs`): ``{"prompt", "chosen", "rejected"}``, the prompt a
  string or a list of messages, chosen and rejected the two candidate replies.
* **Prompts with a verifier** (:func:`load_prompts`): ``{"prompt", "answer"}`` (and optionally
  ``"task"``): RL rewards a completion that matches ``answer`` exactly.

:func:`split_held_out` sets a fraction of any of these aside for evaluation, by hash (the same
items in every run).

A bad record raises an error naming the file and line and what was expected; with
``skip_invalid=True`` bad lines are skipped and counted instead (``Loaded.skipped``).

:func:`write_task_data` writes a folder of synthetic-task data (:mod:`scratchlm.posttrain.tasks`)
in these shapes, plus a plain-text corpus to pretrain a base model on, and a manifest with
sha256 checksums.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.io import atomic_write, sha256_file, write_json
from scratchlm.posttrain.tasks import TASKS, check, make_problems, wrong_answer
from scratchlm.tokenizers.chat import check_messages

TASK_DATA_FORMAT = "scratchlm.task-data"


class Conversation(list):
    """A list of messages that remembers where it was read (``where``: "file, line N")."""

    where = "a conversation"


@dataclass
class Pair:
    prompt: list[dict]  # the conversation so far (ends with a user message)
    chosen: str
    rejected: str
    where: str = "a pair"


@dataclass
class PromptWithAnswer:
    prompt: list[dict]
    answer: str | None  # None: a bare prompt (a reward model judges its replies)
    task: str | None = None
    where: str = "a prompt"

    def reward(self, completion: str) -> float:
        """1 for an exact answer (surrounding whitespace ignored), else 0."""
        if self.answer is None:
            raise ValueError(f"{self.where} has no answer to check a reply against")
        return float(check(self.answer, completion))


@dataclass
class Loaded:
    items: list
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skipped lines' reasons


def as_messages(value, what: str) -> list[dict]:
    """A prompt as messages: a string is one user message; a list is checked (roles, contents)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    check_messages(value)
    return value


def _sft(record: dict) -> list[dict]:
    if "messages" in record:
        messages = as_messages(record["messages"], "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant message: nothing to learn")
        return messages
    if "instruction" in record and "output" in record:
        extra = _text(record, "input") if record.get("input") is not None else ""
        user = _text(record, "instruction") + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record, "output")}]
    if "prompt" in record and "completion" in record:
        return as_messages(record["prompt"], "prompt") + [
            {"role": "assistant", "content": _text(record, "completion")}
        ]
    raise ValueError(
        'expected {"messages": [...]}, {"instruction", "input", "output"} (Alpaca) or '
        '{"prompt", "completion"}'
    )


def _pair(record: dict) -> Pair:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f'expected {{"prompt", "chosen", "rejected"}}; missing {missing}')
    return Pair(as_messages(record["prompt"], "prompt"), _text(record, "chosen"), _text(record, "rejected"))


def _prompt(record: dict, require_answer: bool = True) -> PromptWithAnswer:
    if "prompt" not in record or (require_answer and "answer" not in record):
        raise ValueError('expected {"prompt", "answer"} (a prompt and the exact answer a verifier accepts)')
    answer = _text(record, "answer") if record.get("answer") is not None else None
    messages = as_messages(record["prompt"], "prompt")
    if messages[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user message (the turn to reply to)")
    return PromptWithAnswer(messages, answer, record.get("task"))


def _text(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def load_records(path: str | Path, parse, skip_invalid: bool) -> Loaded:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a JSONL file, one record per line)")
    loaded = Loaded([])
    offset = 0  # of the line's first byte in the file
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = _utf8(raw, start)
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                item = parse(record)
                where = f"{path}, line {number}"
                if isinstance(item, list):
                    item = Conversation(item)
                item.where = where
                loaded.items.append(item)
            except (ValueError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
                message = f"{path}, line {number}: {e}"
                if not skip_invalid:
                    raise ValueError(message + " (or pass --skip-invalid to skip bad lines)") from None
                loaded.skipped += 1
                if len(loaded.errors) < 5:
                    loaded.errors.append(message)
    if not loaded.items:
        raise ValueError(
            f"{path}: no valid records" + (f" ({loaded.skipped} skipped)" if loaded.skipped else "")
        )
    return loaded


def _utf8(raw: bytes, start: int) -> str:
    """A line's text; bytes that are not UTF-8 raise a ValueError naming the file offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"byte offset {start + e.start}: {raw[e.start : e.start + 1]!r} is not UTF-8 ({e.reason}); "
            "JSONL is UTF-8 text: convert the file (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
        ) from None


def load_sft(path: str | Path, skip_invalid: bool = False) -> Loaded:
    return load_records(path, _sft, skip_invalid)


def load_pairs(path: str | Path, skip_invalid: bool = False) -> Loaded:
    return load_records(path, _pair, skip_invalid)


def load_prompts(path: str | Path, skip_invalid: bool = False, require_answer: bool = True) -> Loaded:
    """Prompts with their answers; ``require_answer=False`` also takes bare ``{"prompt"}`` lines
    (PPO with a reward model needs no answer)."""
    return load_records(path, lambda record: _prompt(record, require_answer), skip_invalid)


def split_held_out(items: list, key, fraction: float) -> tuple[list, list]:
    """(train, held out): ``fraction`` of ``items`` set aside by the hash of ``key(item)``, the same
    way in every run (conversations by their stripped text, pairs and prompts by their prompt)."""
    out = [_held_out(key(item), fraction) for item in items]
    return [i for i, o in zip(items, out) if not o], [i for i, o in zip(items, out) if o]


def _held_out(messages: list[dict], fraction: float) -> bool:
    import hashlib

    key = repr([(m["role"], m["content"].strip()) for m in messages]).encode()  # as rendered
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 10_000 < fraction * 10_000


def write_task_data(
    out: str | Path,
    tasks: list[str],
    *,
    train: int = 2000,
    test: int = 200,
    difficulty: int = 2,
    seed: int = 0,
) -> dict:
    """Write ``{sft,pairs,prompts}-{train,test}.jsonl``, ``corpus-train.txt`` and ``manifest.json``.

    ``train`` and ``test`` are problems *per task*. The corpus is the training problems written
    out as plain text ("12+30=42"), one per line, for pretraining a base model that has seen the
    tasks' symbols but never the chat format."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown}; tasks: {sorted(TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    manifest = {
        "format": TASK_DATA_FORMAT,
        "version": 1,
        "tasks": tasks,
        "difficulty": difficulty,
        "seed": seed,
        "files": {},
    }
    for split, n in (("train", train), ("test", test)):
        problems = [p for task in tasks for p in make_problems(task, n, split, difficulty, seed)]
        rng.shuffle(problems)
        rows = {
            "sft": [
                {
                    "messages": [
                        {"role": "user", "content": p.prompt},
                        {"role": "assistant", "content": p.answer},
                    ],
                    "task": p.task,
                }
                for p in problems
            ],
            "pairs": [
                {"prompt": p.prompt, "chosen": p.answer, "rejected": wrong_answer(p, rng), "task": p.task}
                for p in problems
            ],
            "prompts": [{"prompt": p.prompt, "answer": p.answer, "task": p.task} for p in problems],
        }
        for kind, records in rows.items():
            name = f"{kind}-{split}.jsonl"
            with atomic_write(out / name, "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            manifest["files"][name] = {"records": len(records), "sha256": sha256_file(out / name)}
        if split == "train":
            with atomic_write(out / "corpus-train.txt", "w") as f:
                f.writelines(f"{p.prompt}{p.answer}\n" for p in problems)
            manifest["files"]["corpus-train.txt"] = {
                "records": len(problems),
                "sha256": sha256_file(out / "corpus-train.txt"),
            }
    write_json(out / "manifest.json", manifest)
    return manifest
