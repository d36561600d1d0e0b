"""Critics: who judges a reply against a principle, when a rule cannot.

:class:`Constitution` holds the principles with their critics and judges replies against all of
them, batched: a programmatic check (:func:`~scratchlm.posttrain.critique.principles.check_reply`),
the model itself asked in words (``model``: the critic of Bai et al., 2022 — the reply passes if
the critique starts with the pass word), or a scorer (``scorer``: any ``(prompt messages, reply)
-> float`` under a name, passing at ``threshold``; a reward model fits, :class:`RewardScorer`).
Scorers come from the API or the command line (:func:`load_scorer`), and a resumed run knows each
by :func:`scorer_identity`. What a model reads is cleaned first: no special token's text
(:func:`without_special_tokens`), no character its tokenizer cannot spell (:func:`speakable`).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from scratchlm.io import sha256_file
from scratchlm.posttrain.critique.principles import Critique, Evaluation, Principle, check_reply

Scorer = Callable[[list, str], float]  # (prompt messages, reply) -> score; higher is better

# What the model reads. Plain lowercase words: a character-level model knows few symbols (any
# character its tokenizer cannot spell is left out of what it reads, see `speakable`).
# The principle comes last: a request longer than the context loses its start (the conversation),
# never the principle it asks about.
CRITIQUE_REQUEST = (
    "{conversation}\nreply: {reply}\n{principle}\ndoes the reply follow this? answer yes or no and why"
)


class Constitution:
    """Principles with their critics: :meth:`evaluate` judges replies against all of them.

    ``model``/``tokenizer``: the model a ``model`` check asks by default (the starting
    checkpoint); a check with its own ``checkpoint`` loads that one. ``scorers``: the callables a
    ``scorer`` check names."""

    def __init__(
        self,
        principles: list[Principle],
        *,
        model=None,
        tokenizer=None,
        scorers: dict[str, Scorer] | None = None,
        device=None,
    ):
        self.principles, self.scorers = principles, dict(scorers or {})
        self._models: dict[str | None, tuple] = {None: (model, tokenizer)}
        self.device = device
        for p in principles:
            if p.check["kind"] == "scorer" and p.check["name"] not in self.scorers:
                raise ValueError(
                    f"principle {p.name!r} asks for the scorer {p.check['name']!r}, but none of that name "
                    f"was given (given: {sorted(self.scorers) or 'none'}): pass scorers={{name: function}} "
                    "to the API, or --scorer NAME=MODULE:FUNCTION on the command line"
                )
            if p.check["kind"] == "model" and p.check["checkpoint"] is None and model is None:
                raise ValueError(
                    f"principle {p.name!r} asks the model for a critique, but no model was given"
                )

    def evaluate(
        self, prompts: list[list[dict]], replies: list[str], ended: list[bool] | None = None
    ) -> list[Evaluation]:
        """One :class:`Evaluation` per (prompt, reply); model critics run batched, one pass per principle.
        ``ended``: whether each reply closed its turn (default: all did)."""
        # A sampled special token's text (ignore_eos lets <|endoftext|> through) would be refused by the
        # chat template of a model critic or a scorer: the critics read the reply without it.
        replies = [without_special_tokens(r, self._models[None][1]) for r in replies]
        columns = [self._critique(p, prompts, replies) for p in self.principles]
        ended = ended if ended is not None else [True] * len(replies)
        return [Evaluation([column[i] for column in columns], ended[i]) for i in range(len(replies))]

    def _critique(
        self, principle: Principle, prompts: list[list[dict]], replies: list[str]
    ) -> list[Critique]:
        check = principle.check
        if check["kind"] == "scorer":
            fn = self.scorers[check["name"]]
            batch = getattr(fn, "batch", None)  # a scorer that scores many replies at once (a reward model)
            scores = (
                [float(v) for v in batch(prompts, replies)]
                if batch is not None and replies
                else [float(fn(prompt, reply)) for prompt, reply in zip(prompts, replies)]
            )
            bad = [v for v in scores if not math.isfinite(v)]
            if bad:
                raise ValueError(
                    f"the scorer {check['name']!r} (principle {principle.name!r}) returned {bad[0]}: a "
                    "score must be a finite number"
                )
            return [
                Critique(
                    s >= check["threshold"],
                    s,
                    "" if s >= check["threshold"] else f"it scores {s:.3g}, below {check['threshold']:g}",
                )
                for s in scores
            ]
        if check["kind"] == "model":
            return self._model_critiques(principle, prompts, replies)
        return [check_reply(check, reply) for reply in replies]

    def _model_critiques(
        self, principle: Principle, prompts: list[list[dict]], replies: list[str]
    ) -> list[Critique]:
        """The model writes a critique of each reply; the reply passes if it starts with the pass word."""
        from scratchlm.serve.chat import generate_replies, load_chat_model

        check = principle.check
        if check["checkpoint"] not in self._models:
            self._models[check["checkpoint"]] = load_chat_model(check["checkpoint"], device=self.device)
        model, tokenizer = self._models[check["checkpoint"]]
        requests = [
            critique_request(principle, prompt, reply, tokenizer) for prompt, reply in zip(prompts, replies)
        ]
        if not requests:
            return []
        max_tokens = min(check["max_tokens"], model.config.block_size - 1)
        texts = [
            without_special_tokens(r["text"], tokenizer).strip()
            for r in generate_replies(model, tokenizer, requests, max_tokens)
        ]
        word = check["pass"].lower()
        firsts = [re.search(r"\w+", t) for t in texts]  # the first word, after any punctuation
        verdicts = [m is not None and m.group().lower() == word for m in firsts]
        return [Critique(ok, float(ok), "" if ok else t) for ok, t in zip(verdicts, texts)]


def without_special_tokens(text: str, tokenizer=None) -> str:
    """``text`` without any special token's text (the tokenizer's, and always the chat tokens):
    a model samples them as ordinary tokens where the chat template refuses them as content."""
    from scratchlm.tokenizers.chat import CHAT_TOKENS, ENDOFTEXT

    for name in sorted(
        {*CHAT_TOKENS, ENDOFTEXT, *(getattr(tokenizer, "special_tokens", None) or ())}, key=len, reverse=True
    ):
        text = text.replace(name, "")
    return text


def critique_request(principle: Principle, prompt: list[dict], reply: str, tokenizer) -> list[dict]:
    """What a model critic is asked: the conversation, the reply, then the principle (one user message)."""
    conversation = "\n".join(
        f"{m['role']}: {without_special_tokens(m['content'], tokenizer)}" for m in prompt
    )
    text = CRITIQUE_REQUEST.format(
        conversation=conversation, reply=without_special_tokens(reply, tokenizer), principle=principle.text
    )
    return [{"role": "user", "content": speakable(text, tokenizer)}]


def speakable(text: str, tokenizer) -> str:
    """``text`` without the characters the tokenizer cannot encode (a character-level model
    trained on digits cannot read a period; byte-level and BPE tokenizers encode everything)."""
    try:
        tokenizer.encode_ordinary(text)
        return text
    except ValueError:
        return "".join(c for c in text if _encodes(tokenizer, c))


def _encodes(tokenizer, c: str) -> bool:
    try:
        tokenizer.encode_ordinary(c)
        return True
    except ValueError:
        return False


def load_scorer(spec: str) -> Scorer:
    """``"package.module:function"`` -> the function (the command line's ``--scorer NAME=SPEC``)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"a scorer is given as MODULE:FUNCTION (e.g. my_rewards:score), got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"scorer {spec!r}: cannot import it ({e}); the module must be importable (on PYTHONPATH)"
        ) from None
    if not callable(fn):
        raise ValueError(f"scorer {spec!r} is not a function (expected (prompt messages, reply) -> float)")
    return fn


def scorer_identity(fn) -> object:
    """What a resumed run compares a scorer by: its ``identity`` attribute (a reward model's folder
    and weights' sha256), else ``module:qualified name``."""
    identity = getattr(fn, "identity", None)
    if identity is not None:
        return json.loads(json.dumps(identity))
    target = getattr(fn, "__func__", fn)  # a bound method: its function
    if not hasattr(target, "__qualname__"):  # a callable object: its class
        target = type(fn)
    return f"{target.__module__}:{target.__qualname__}"


class RewardScorer:
    """A reward model as a scorer: batched through :class:`~scratchlm.posttrain.reward.RewardModel`
    (``batch``), and known on resume by its folder and its weights' sha256 (``identity``)."""

    def __init__(self, path: str | Path, device=None):
        from scratchlm.device import pick_device
        from scratchlm.posttrain.reward import load_reward_model

        folder = Path(path).resolve()
        self.reward_model = load_reward_model(folder, pick_device(device))
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        weights = ((state.get("files") or {}).get("model.safetensors") or {}).get("sha256")
        self.identity = {
            "reward_model": str(folder),
            "model_sha256": weights or sha256_file(folder / "model.safetensors"),
        }

    def batch(self, prompts: list[list[dict]], replies: list[str]) -> list[float]:
        return [float(v) for v in self.reward_model(prompts, replies)]

    def __call__(self, prompt: list[dict], reply: str) -> float:
        return self.batch([prompt], [reply])[0]
