"""Synthetic tasks whose answers can be checked exactly: the measuring stick of post-training.

On a CPU in minutes we cannot judge open-ended answers, but we can ask a small model to add two
numbers, count letters, reverse, sort or copy a string, or look up a key, and check its answer
character for character. Each task makes :class:`Problem` s at a *difficulty* (more digits, longer
strings, more keys), a plausible wrong answer for preference pairs (a dropped carry, an
off-by-one count, two letters swapped), and a checker (exact match after stripping whitespace).

**Held-out splits.** A problem belongs to the test split if the hash of its text says so
(``split_of``), whatever seed or order produced it: a test problem can never appear in training
data made by another run, with another seed, or at another size.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str


def split_of(task: str, prompt: str, test_percent: int = 10) -> str:
    """``"test"`` for ``test_percent`` % of all problems (by hash of the problem), else ``"train"``.

    An addition is hashed with its operands sorted: ``a+b=`` and ``b+a=`` are the same problem,
    and must not sit on both sides of the split."""
    key = prompt
    if task == "addition":
        key = "+".join(sorted(prompt[:-1].split("+"), key=int)) + "="
    h = int.from_bytes(hashlib.sha256(f"{task}\x00{key}".encode()).digest()[:8], "big")
    return "test" if h % 100 < test_percent else "train"


def check(problem_answer: str, completion: str) -> bool:
    """Exact match, ignoring surrounding whitespace."""
    return completion.strip() == problem_answer


def _word(rng: random.Random, n: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _swap_two(rng: random.Random, s: str) -> str:
    """``s`` with two different neighbouring characters swapped (``s`` itself if there are none)."""
    spots = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
    if not spots:
        return s
    i = rng.choice(spots)
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :]


def _digit_slip(rng: random.Random, value: int) -> int:
    """A near miss: one digit of ``value`` off by one (as from a dropped or extra carry)."""
    digits = len(str(abs(value)))
    place = 10 ** rng.randrange(digits)
    wrong = value + rng.choice((-1, 1)) * place
    return wrong if wrong >= 0 and wrong != value else value + place


def addition(rng: random.Random, difficulty: int) -> Problem:
    a, b = rng.randrange(10**difficulty), rng.randrange(10**difficulty)
    return Problem("addition", f"{a}+{b}=", str(a + b))


def subtraction(rng: random.Random, difficulty: int) -> Problem:
    a, b = sorted((rng.randrange(10**difficulty), rng.randrange(10**difficulty)), reverse=True)
    return Problem("subtraction", f"{a}-{b}=", str(a - b))


def count(rng: random.Random, difficulty: int) -> Problem:
    word = _word(rng, 3 + 3 * difficulty, LETTERS[: 4 + difficulty])
    letter = rng.choice(word)
    return Problem("count", f"count {letter} in {word}:", str(word.count(letter)))


def reverse(rng: random.Random, difficulty: int) -> Problem:
    word = _word(rng, 2 + 2 * difficulty)
    return Problem("reverse", f"reverse {word}:", word[::-1])


def sort(rng: random.Random, difficulty: int) -> Problem:
    word = _word(rng, 2 + 2 * difficulty)
    return Problem("sort", f"sort {word}:", "".join(sorted(word)))


def copy(rng: random.Random, difficulty: int) -> Problem:
    word = _word(rng, 3 + 3 * difficulty)
    return Problem("copy", f"copy {word}:", word)


def lookup(rng: random.Random, difficulty: int) -> Problem:
    keys = rng.sample(LETTERS, 1 + 2 * difficulty)
    values = {k: rng.randrange(10) for k in keys}
    key = rng.choice(keys)
    table = " ".join(f"{k}={v}" for k, v in values.items())
    return Problem("lookup", f"{table}; {key}?", str(values[key]))


TASKS = {f.__name__: f for f in (addition, subtraction, count, reverse, sort, copy, lookup)}


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: what a model that almost has it would say."""
    a = problem.answer
    if problem.task in ("addition", "subtraction"):
        return str(_digit_slip(rng, int(a)))
    if problem.task == "count":
        n = int(a)
        return str(n + 1 if n <= 1 or rng.random() < 0.5 else n - 1)
    if problem.task == "lookup":
        return str((int(a) + rng.randrange(1, 10)) % 10)
    wrong = _swap_two(rng, a)
    if wrong == a:  # nothing to swap ("aaaa"): change the last letter
        wrong = a[:-1] + ("b" if a[-1] != "b" else "c")
    return wrong


def make_problems(
    task: str, n: int, split: str, difficulty: int = 2, seed: int = 0, test_percent: int = 10
) -> list[Problem]:
    """``n`` distinct problems of one task from one split (raises if the split has fewer)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    make = TASKS[task]
    rng = random.Random(f"{task}/{split}/{difficulty}/{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(
                f"only {len(out)} distinct {split} problems of {task!r} at difficulty {difficulty} "
                f"were found, {n} asked: raise the difficulty or ask for fewer"
            )
        p = make(rng, difficulty)
        if p.prompt in seen or split_of(task, p.prompt, test_percent) != split:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out
